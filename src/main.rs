//! The `kas-gateway` command.

use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use kas_gateway::clock::SystemClock;
use kas_gateway::config::ConfigArgs;
use kas_gateway::domain::{
    AccessLevel, Caller, NewProjectInput, NewTokenInput, NewUserInput, ProjectRef, Scope, Service,
    parse_date,
};
use kas_gateway::{server, telemetry};

#[derive(Parser, Debug)]
#[command(
    name = "kas-gateway",
    version,
    about = "The GitLab side of receptive Kubernetes agents"
)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs the gateway.
    Serve,
    /// Applies database migrations and exits.
    Migrate,
    /// Administration of users, tokens, projects, members and encryption keys.
    #[command(subcommand)]
    Admin(Admin),
    /// Certificates for trying the gateway out.
    #[command(subcommand)]
    Certs(Certs),
}

#[derive(Subcommand, Debug)]
enum Certs {
    /// Writes a development CA, a server certificate for an agent host and an mTLS client
    /// certificate (with their keys, mode 0600).
    Dev {
        /// Output directory.
        #[arg(long, default_value = "certs")]
        out: std::path::PathBuf,
        /// Host name of the agent's server certificate (localhost and 127.0.0.1 are added).
        #[arg(long, default_value = "agent.local")]
        host: String,
    },
}

#[derive(Subcommand, Debug)]
enum Admin {
    /// Creates a user.
    CreateUser {
        /// Login name.
        #[arg(long)]
        username: String,
        /// Display name.
        #[arg(long)]
        name: String,
        /// E-mail address.
        #[arg(long)]
        email: String,
        /// Makes the user an administrator.
        #[arg(long)]
        admin: bool,
    },
    /// Creates a personal access token and prints it (once).
    CreateToken {
        /// The user's username.
        #[arg(long)]
        user: String,
        /// Token name.
        #[arg(long)]
        name: String,
        /// Scopes, comma-separated: api, read_api.
        #[arg(long, value_delimiter = ',', default_value = "api")]
        scopes: Vec<String>,
        /// Expiry date, YYYY-MM-DD.
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// Creates a project in a user's namespace, with that user as Owner.
    CreateProject {
        /// The owner's username.
        #[arg(long)]
        owner: String,
        /// Project name.
        #[arg(long)]
        name: String,
        /// Project path (derived from the name by default).
        #[arg(long)]
        path: Option<String>,
        /// Description.
        #[arg(long)]
        description: Option<String>,
    },
    /// Adds a user to a project.
    AddMember {
        /// Project id or full path (namespace/project).
        #[arg(long)]
        project: String,
        /// The user's username.
        #[arg(long)]
        user: String,
        /// guest, planner, reporter, developer, maintainer, owner, or the number.
        #[arg(long)]
        access_level: String,
    },
    /// Re-encrypts every stored secret under the active key. With the generated key file,
    /// first adds a new key to it; with configured keys, put the new key first beforehand.
    RotateEncryptionKey,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::Certs(Certs::Dev { out, host }) = &cli.command {
        #[allow(clippy::disallowed_methods)] // certificates are dated by the wall clock
        let now = time::OffsetDateTime::now_utc();
        for file in kas_gateway::certs::write_dev_certs(out, host, now)? {
            println!("wrote {}", file.display());
        }
        return Ok(());
    }
    let config = cli.config.resolve()?;
    telemetry::init(&config.log_level, config.log_format)?;
    match cli.command {
        Command::Certs(_) => Ok(()),
        Command::Serve => {
            let shutdown = CancellationToken::new();
            server::cancel_on_signals(shutdown.clone());
            let running = server::start(&config, Arc::new(SystemClock), shutdown).await?;
            running.wait().await
        }
        Command::Migrate => {
            let store = server::open_store(&config).await?;
            store.close().await;
            Ok(())
        }
        Command::Admin(admin) => {
            let (store, service) = server::open_service(&config, Arc::new(SystemClock)).await?;
            server::bootstrap(&service, &config).await?;
            let outcome = run_admin(&service, admin).await;
            store.close().await;
            outcome
        }
    }
}

async fn run_admin(service: &Service, admin: Admin) -> anyhow::Result<()> {
    let operator = Caller::operator();
    match admin {
        Admin::CreateUser {
            username,
            name,
            email,
            admin,
        } => {
            let user = service
                .create_user(
                    &operator,
                    NewUserInput {
                        username,
                        name,
                        email,
                        admin,
                    },
                )
                .await
                .map_err(explain)?;
            println!("created user {} (id {})", user.username, user.id);
        }
        Admin::CreateToken {
            user,
            name,
            scopes,
            expires_at,
        } => {
            let user = service.user_by_username(&user).await.map_err(explain)?;
            let scopes = scopes
                .iter()
                .map(|s| Scope::parse(s.trim()).with_context(|| format!("unknown scope {s:?}")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let expires_at = expires_at
                .map(|d| parse_date(&d).with_context(|| format!("{d:?} is not a YYYY-MM-DD date")))
                .transpose()?;
            let (_, secret) = service
                .create_personal_token(
                    &operator,
                    user.id,
                    NewTokenInput {
                        name,
                        scopes,
                        expires_at,
                    },
                )
                .await
                .map_err(explain)?;
            println!("{}", secret.expose());
        }
        Admin::CreateProject {
            owner,
            name,
            path,
            description,
        } => {
            let owner = service.user_by_username(&owner).await.map_err(explain)?;
            let project = service
                .create_project(
                    &operator,
                    NewProjectInput {
                        name: Some(name),
                        path,
                        description,
                        namespace_id: Some(owner.id),
                    },
                )
                .await
                .map_err(explain)?;
            println!(
                "created project {} (id {})",
                project.path_with_namespace(),
                project.id
            );
        }
        Admin::AddMember {
            project,
            user,
            access_level,
        } => {
            let level = AccessLevel::parse(&access_level)
                .with_context(|| format!("unknown access level {access_level:?}"))?;
            let user = service.user_by_username(&user).await.map_err(explain)?;
            let member = service
                .add_member(&operator, &ProjectRef::parse(&project), user.id, level)
                .await
                .map_err(explain)?;
            println!(
                "{} is now {} of {project}",
                member.user.username,
                member.access_level.name()
            );
        }
        Admin::RotateEncryptionKey => {
            if let Some(id) = service.add_encryption_key()? {
                println!("added encryption key {id} to the key file; it is now the active key");
            }
            let (changed, current) = service.reencrypt_secrets().await.map_err(explain)?;
            println!(
                "re-encrypted {changed} secret(s) under key {}; {current} already were",
                service.active_encryption_key()
            );
        }
    }
    Ok(())
}

/// The error as a client would see it, for the operator.
fn explain(error: kas_gateway::domain::Error) -> anyhow::Error {
    anyhow::anyhow!("{}", error.reply().body)
}
