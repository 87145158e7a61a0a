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
    /// Administration of users, tokens, projects and members.
    #[command(subcommand)]
    Admin(Admin),
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.config.resolve()?;
    telemetry::init(&config.log_level, config.log_format)?;
    match cli.command {
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
            let store = server::open_store(&config).await?;
            let service = Service::new(Arc::clone(&store), Arc::new(SystemClock));
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
    }
    Ok(())
}

/// The error as a client would see it, for the operator.
fn explain(error: kas_gateway::domain::Error) -> anyhow::Error {
    anyhow::anyhow!("{}", error.reply().body)
}
