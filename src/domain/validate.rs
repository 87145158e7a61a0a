//! Model validations, with GitLab's messages.

/// Maximum length of an agent name.
pub const AGENT_NAME_MAX: usize = 63;
/// Maximum length of an agent token name.
pub const TOKEN_NAME_MAX: usize = 255;
/// Maximum length of an agent token description.
pub const TOKEN_DESCRIPTION_MAX: usize = 1024;

/// Full messages for an agent name; empty when valid. Uniqueness is the store's to check.
pub fn agent_name(name: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if name.trim().is_empty() {
        errors.push("Name can't be blank".to_owned());
    }
    if name.chars().count() > AGENT_NAME_MAX {
        errors.push(format!(
            "Name is too long (maximum is {AGENT_NAME_MAX} characters)"
        ));
    }
    if !is_dns_label(name) {
        errors.push(
            "Name can contain only lowercase letters, digits, and '-', but cannot start or end with '-'"
                .to_owned(),
        );
    }
    errors
}

/// `^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`
fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    let allowed = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            allowed(first) && allowed(last) && bytes.iter().all(|b| allowed(b) || *b == b'-')
        }
        _ => false,
    }
}

/// Full messages for an agent token's name and description; empty when valid.
pub fn agent_token(name: &str, description: Option<&str>) -> Vec<String> {
    let mut errors = Vec::new();
    if name.trim().is_empty() {
        errors.push("Name can't be blank".to_owned());
    }
    if name.chars().count() > TOKEN_NAME_MAX {
        errors.push(format!(
            "Name is too long (maximum is {TOKEN_NAME_MAX} characters)"
        ));
    }
    if description.is_some_and(|d| d.chars().count() > TOKEN_DESCRIPTION_MAX) {
        errors.push(format!(
            "Description is too long (maximum is {TOKEN_DESCRIPTION_MAX} characters)"
        ));
    }
    errors
}

/// Messages for a username (GitLab's namespace path rules); empty when valid.
pub fn username(username: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if username.is_empty() {
        errors.push("can't be blank".to_owned());
        return errors;
    }
    if username.chars().count() > 255 {
        errors.push("is too long (maximum is 255 characters)".to_owned());
    }
    if !is_path(username) || username.starts_with('.') || username.ends_with('.') {
        errors.push(
            "can contain only letters, digits, '_', '-' and '.'. Cannot start with '-' or end in '.', '.git' or '.atom'."
                .to_owned(),
        );
    }
    errors
}

/// Messages for an e-mail address; empty when valid.
pub fn email(email: &str) -> Vec<String> {
    let valid = email.split_once('@').is_some_and(|(local, domain)| {
        !local.is_empty() && !domain.is_empty() && !domain.contains('@') && !email.contains(' ')
    });
    if valid {
        Vec::new()
    } else {
        vec!["is invalid".to_owned()]
    }
}

/// Messages for a display name of a user; empty when valid.
pub fn display_name(name: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if name.trim().is_empty() {
        errors.push("can't be blank".to_owned());
    }
    if name.chars().count() > 255 {
        errors.push("is too long (maximum is 255 characters)".to_owned());
    }
    errors
}

/// Messages for a project name; empty when valid.
pub fn project_name(name: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if name.trim().is_empty() {
        errors.push("can't be blank".to_owned());
        return errors;
    }
    if name.chars().count() > 255 {
        errors.push("is too long (maximum is 255 characters)".to_owned());
    }
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_alphanumeric() || c == '_' || is_emoji(c));
    let rest_ok = name.chars().all(|c| {
        c.is_alphanumeric()
            || matches!(c, '_' | '.' | '+' | '-' | ' ' | '\u{2010}'..='\u{2015}')
            || is_emoji(c)
    });
    if !first_ok || !rest_ok {
        errors.push(
            "can contain only letters, digits, emoji, '_', '.', '+', dashes, or spaces. It must start with a letter, digit, emoji, or '_'."
                .to_owned(),
        );
    }
    errors
}

/// Messages for a project path; empty when valid.
pub fn project_path(path: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if path.is_empty() {
        errors.push("can't be blank".to_owned());
        return errors;
    }
    if path.chars().count() > 255 {
        errors.push("is too long (maximum is 255 characters)".to_owned());
    }
    if !is_path(path) {
        errors.push(
            "can contain only letters, digits, '_', '-' and '.'. Cannot start with '-', end in '.git' or end in '.atom'"
                .to_owned(),
        );
    }
    errors
}

/// GitLab's path rule: `[A-Za-z0-9_.][A-Za-z0-9_.-]*`, not ending in `.git` or `.atom`.
fn is_path(path: &str) -> bool {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    !path.starts_with('-')
        && path.chars().all(allowed)
        && !path.ends_with(".git")
        && !path.ends_with(".atom")
}

fn is_emoji(c: char) -> bool {
    ('\u{00A9}'..='\u{1F9FF}').contains(&c) && !c.is_alphanumeric() && !c.is_whitespace()
}

/// The path GitLab derives from a project name: lower case, runs of other characters as `-`.
pub fn path_from_name(name: &str) -> String {
    let mut path = String::with_capacity(name.len());
    for c in name.trim().chars() {
        if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
            path.push(c.to_ascii_lowercase());
        } else if !path.ends_with('-') {
            path.push('-');
        }
    }
    path.trim_matches('-').to_owned()
}

/// A receptive agent's URL, checked and normalised: what is stored, returned and dialled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentUrl {
    /// `grpcs://` rather than `grpc://`.
    pub tls: bool,
    /// Where the agent is.
    pub host: AgentHost,
    /// The port, when the URL gives one.
    pub port: Option<u16>,
}

/// The host of an [`AgentUrl`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentHost {
    /// A DNS name, lower case ASCII (international names in punycode).
    Name(String),
    /// An address.
    Ip(std::net::IpAddr),
}

/// Why a URL is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UrlProblem {
    /// Not a `grpc://` or `grpcs://` URL of a host and a port only.
    Invalid,
    /// It carries a user name or password, which would be stored and shown to every Developer.
    Credentials,
}

impl UrlProblem {
    /// GitLab's form of the message.
    pub const fn message(self) -> &'static str {
        match self {
            Self::Invalid => "Url is not a valid URL",
            Self::Credentials => "Url must not contain a user name or password",
        }
    }
}

/// Longest DNS name, in characters (RFC 1035, without the final dot).
const DNS_NAME_MAX: usize = 253;
/// Longest DNS label.
const DNS_LABEL_MAX: usize = 63;

impl AgentUrl {
    /// Reads `grpc://host[:port]` or `grpcs://host[:port]`, with at most a lone `/` after it.
    /// Anything that would be dialled differently from how it reads is refused: whitespace
    /// and control characters anywhere (the URL parser would silently drop a newline),
    /// credentials, a path, query or fragment, port 0, and names DNS cannot carry.
    pub fn parse(input: &str) -> Result<Self, UrlProblem> {
        if input.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(UrlProblem::Invalid);
        }
        let url = url::Url::parse(input).map_err(|_| UrlProblem::Invalid)?;
        let tls = match url.scheme() {
            "grpcs" => true,
            "grpc" => false,
            _ => return Err(UrlProblem::Invalid),
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err(UrlProblem::Credentials);
        }
        if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
            return Err(UrlProblem::Invalid);
        }
        let host = match url.host() {
            Some(url::Host::Ipv6(addr)) => AgentHost::Ip(addr.into()),
            // grpc:// is not a scheme the URL standard knows, so its host stays opaque
            // (no IDNA, no IPv4 parsing): parse it as a web URL's host to get both, so
            // that `0xa9fea9fe` is the address it dials and `bücher.example` its punycode.
            Some(url::Host::Domain(opaque)) => match url::Host::parse(opaque) {
                Ok(url::Host::Domain(name)) if is_dns_name(&name) => AgentHost::Name(name),
                Ok(url::Host::Ipv4(addr)) => AgentHost::Ip(addr.into()),
                Ok(url::Host::Ipv6(addr)) => AgentHost::Ip(addr.into()),
                _ => return Err(UrlProblem::Invalid),
            },
            _ => return Err(UrlProblem::Invalid),
        };
        let port = match url.port() {
            Some(0) => return Err(UrlProblem::Invalid),
            port => port,
        };
        Ok(Self { tls, host, port })
    }

    /// The port to dial: the URL's, else 443 for `grpcs://` and 80 for `grpc://`.
    pub fn port_or_default(&self) -> u16 {
        self.port.unwrap_or(if self.tls { 443 } else { 80 })
    }

    /// The host as a resolver takes it: a name, or an address without brackets.
    pub fn host_str(&self) -> String {
        match &self.host {
            AgentHost::Name(name) => name.clone(),
            AgentHost::Ip(addr) => addr.to_string(),
        }
    }
}

impl std::fmt::Display for AgentUrl {
    /// The normalised form: lower-case scheme and host, no trailing `/`, the port only when
    /// given.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.tls { "grpcs://" } else { "grpc://" })?;
        match &self.host {
            AgentHost::Name(name) => f.write_str(name)?,
            AgentHost::Ip(std::net::IpAddr::V4(addr)) => write!(f, "{addr}")?,
            AgentHost::Ip(std::net::IpAddr::V6(addr)) => write!(f, "[{addr}]")?,
        }
        match self.port {
            Some(port) => write!(f, ":{port}"),
            None => Ok(()),
        }
    }
}

/// Labels of letters, digits, `-` and `_`, 1 to 63 characters each, 253 at most in all. The
/// URL standard lets `!`, `$`, `*` and friends through, which no resolver looks up; an empty
/// label (`a..b`, a trailing dot) is refused too, so the stored name is the one dialled.
fn is_dns_name(name: &str) -> bool {
    name.len() <= DNS_NAME_MAX
        && name.split('.').all(|label| {
            (1..=DNS_LABEL_MAX).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case("agent-1", true)]
    #[case("a", true)]
    #[case("0", true)]
    #[case("-agent", false)]
    #[case("agent-", false)]
    #[case("Agent", false)]
    #[case("agent_1", false)]
    #[case("agent.1", false)]
    fn agent_name_format(#[case] name: &str, #[case] valid: bool) {
        assert_eq!(agent_name(name).is_empty(), valid, "{name}");
    }

    #[test]
    fn blank_agent_name_gets_both_messages() {
        assert_eq!(
            agent_name(""),
            vec![
                "Name can't be blank".to_owned(),
                "Name can contain only lowercase letters, digits, and '-', but cannot start or end with '-'".to_owned()
            ]
        );
    }

    #[test]
    fn agent_name_length() {
        assert!(agent_name(&"a".repeat(63)).is_empty());
        assert_eq!(
            agent_name(&"a".repeat(64)),
            vec!["Name is too long (maximum is 63 characters)".to_owned()]
        );
    }

    #[rstest]
    #[case("My Project", "my-project")]
    #[case("  test  ", "test")]
    #[case("a.b_c", "a.b_c")]
    #[case("Héllo wörld", "h-llo-w-rld")]
    fn derived_paths(#[case] name: &str, #[case] path: &str) {
        assert_eq!(path_from_name(name), path);
    }

    #[rstest]
    #[case("test", true)]
    #[case("my.project", true)]
    #[case("-x", false)]
    #[case("x.git", false)]
    #[case("a/b", false)]
    fn paths(#[case] path: &str, #[case] valid: bool) {
        assert_eq!(project_path(path).is_empty(), valid, "{path}");
    }
    #[rstest]
    #[case("grpcs://agent.example.com:4242", "grpcs://agent.example.com:4242")]
    #[case("grpc://10.0.0.1", "grpc://10.0.0.1")]
    #[case("GRPCS://Agent.Example.COM:443/", "grpcs://agent.example.com:443")]
    #[case("grpcs://agent.example.com/", "grpcs://agent.example.com")]
    #[case("grpcs://agent.example.com:04242", "grpcs://agent.example.com:4242")]
    #[case("grpcs://agent.example.com:", "grpcs://agent.example.com")]
    #[case("grpcs://bücher.example:4242", "grpcs://xn--bcher-kva.example:4242")]
    #[case("grpcs://B%C3%BCcher.example", "grpcs://xn--bcher-kva.example")]
    #[case("grpc://[::1]:5", "grpc://[::1]:5")]
    #[case("grpc://[0:0:0:0:0:0:0:1]:5", "grpc://[::1]:5")]
    #[case("grpc://[::FFFF:a9fe:a9fe]:5", "grpc://[::ffff:169.254.169.254]:5")]
    #[case("grpc://0xa9fea9fe:4242", "grpc://169.254.169.254:4242")]
    #[case("grpc://127.1:4242", "grpc://127.0.0.1:4242")]
    #[case("grpc://_agent.svc.cluster.local", "grpc://_agent.svc.cluster.local")]
    fn agent_urls_normalise(#[case] input: &str, #[case] stored: &str) {
        assert_eq!(
            AgentUrl::parse(input).unwrap().to_string(),
            stored,
            "{input}"
        );
        // The stored form reads back as itself.
        assert_eq!(AgentUrl::parse(stored).unwrap().to_string(), stored);
    }

    #[rstest]
    #[case("grpc://127.0.0.1:9/\n2026-01-01T00:00:00Z INFO forged")]
    #[case("grpc://127.0.0.1:9\n")]
    #[case(" grpc://127.0.0.1:9")]
    #[case("grpc://127.0.0.1:9 ")]
    #[case("grpc://agent\t.example.com")]
    #[case("grpc://agent.example.com:9\r")]
    #[case("grpc://agent.example.com:9\u{1b}[2J")]
    #[case("grpc://agent.example.com:9\u{85}")]
    #[case("grpc://agent.example.com:9\u{a0}")]
    #[case("grpc://agent.example.com\0:9")]
    #[case("grpc://agent%0a.example.com:9")]
    #[case("grpc://agent%00.example.com:9")]
    #[case("http://agent:1")]
    #[case("grpcx://agent:1")]
    #[case("grpcs://")]
    #[case("grpcs:agent")]
    #[case("grpcs:///agent")]
    #[case("not a url")]
    #[case("grpcs://agent.example.com/path")]
    #[case("grpcs://agent.example.com//")]
    #[case("grpcs://agent.example.com?x=1")]
    #[case("grpcs://agent.example.com?")]
    #[case("grpcs://agent.example.com#frag")]
    #[case("grpcs://agent.example.com:0")]
    #[case("grpcs://agent.example.com:65536")]
    #[case("grpcs://agent..example.com")]
    #[case("grpcs://agent.example.com.")]
    #[case("grpcs://agent!.example.com")]
    #[case("grpcs://a*b")]
    #[case("grpcs://1.2.3.4.5")]
    #[case("grpcs://[fe80::1%25eth0]:1")]
    #[case("grpcs://xn--a.example")]
    fn agent_urls_refused(#[case] input: &str) {
        assert_eq!(
            AgentUrl::parse(input),
            Err(UrlProblem::Invalid),
            "{input:?}"
        );
    }

    #[rstest]
    #[case("grpcs://user:s3cret@agent.example.com")]
    #[case("grpcs://user@agent.example.com")]
    #[case("grpcs://:s3cret@agent.example.com")]
    fn agent_urls_with_credentials(#[case] input: &str) {
        assert_eq!(AgentUrl::parse(input), Err(UrlProblem::Credentials));
    }

    #[test]
    fn long_names_and_labels() {
        let label = "a".repeat(63);
        let ok = format!("grpcs://{label}.example.com");
        assert!(AgentUrl::parse(&ok).is_ok());
        let long_label = format!("grpcs://{label}a.example.com");
        assert_eq!(AgentUrl::parse(&long_label), Err(UrlProblem::Invalid));
        let long_name = format!("grpcs://{}", [label.as_str(); 4].join("."));
        assert_eq!(AgentUrl::parse(&long_name), Err(UrlProblem::Invalid));
    }

    #[test]
    fn default_ports() {
        let url = AgentUrl::parse("grpcs://[::1]").unwrap();
        assert_eq!(
            (url.port_or_default(), url.host_str()),
            (443, "::1".to_owned())
        );
        let url = AgentUrl::parse("grpc://agent:4242").unwrap();
        assert_eq!(
            (url.port_or_default(), url.host_str()),
            (4242, "agent".to_owned())
        );
        assert_eq!(
            AgentUrl::parse("grpc://agent").unwrap().port_or_default(),
            80
        );
    }

    proptest::proptest! {
        /// Whatever is accepted normalises to a URL that reads back as itself and holds no
        /// control character or whitespace.
        #[test]
        fn accepted_urls_are_stable(input in "(grpcs?|GRPC|http)://[a-zA-Z0-9.:@/\\[\\]%_\\-\\n ü]{0,30}") {
            if let Ok(url) = AgentUrl::parse(&input) {
                let stored = url.to_string();
                proptest::prop_assert!(!stored.chars().any(|c| c.is_control() || c.is_whitespace()));
                proptest::prop_assert_eq!(AgentUrl::parse(&stored), Ok(url));
            }
        }
    }
}
