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
}
