//! The one domain error type. What a client sees for each error is decided in one table,
//! beside the transports: [`crate::respond`].

/// Which "not found" message a client gets; GitLab words them differently per place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Missing {
    /// `404 Project Not Found`: no such project, or the caller is not a member.
    Project,
    /// `404 ClusterAgents Not Found`: a member below Developer lists agents.
    ClusterAgents,
    /// `404 User Not Found`.
    User,
    /// `404 Member Not Found`.
    Member,
    /// `404 Not found`: a row (agent, token) that does not exist.
    Record,
    /// `404 Not Found`: GitLab's generic helper.
    Resource,
}

/// A parameter-level problem, rendered as `{"error":"name is missing"}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParamProblem {
    /// A required parameter is absent.
    Missing(String),
    /// A parameter has the wrong type or shape.
    Invalid(String),
    /// A parameter is outside its allowed values.
    NotAllowed(String),
    /// A rule across parameters, worded whole (`name, path are missing, …`).
    Rule(String),
}

impl ParamProblem {
    /// The problem in words (`name is missing`).
    pub fn message(&self) -> String {
        match self {
            Self::Missing(name) => format!("{name} is missing"),
            Self::Invalid(name) => format!("{name} is invalid"),
            Self::NotAllowed(name) => format!("{name} does not have a valid value"),
            Self::Rule(message) => message.clone(),
        }
    }
}

/// Everything that can go wrong in a domain operation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Missing, unknown, revoked or expired credentials.
    #[error("unauthorized")]
    Unauthorized,
    /// The token lacks a scope the request needs (`api` to write, `sudo` to act as another
    /// user); `scope` names what would do.
    #[error("insufficient scope")]
    InsufficientScope {
        /// The scope(s) that would do, space-separated.
        scope: &'static str,
    },
    /// The caller's role is too low for the operation.
    #[error("forbidden")]
    Forbidden,
    /// Refused, with GitLab's reason (`Must be admin to use sudo`).
    #[error("forbidden: {0}")]
    ForbiddenBecause(&'static str),
    /// Sudo names no user.
    #[error("no user with id or username {0:?}")]
    SudoUserNotFound(String),
    /// The thing asked for does not exist (or is not visible to the caller).
    #[error("not found: {0:?}")]
    NotFound(Missing),
    /// Malformed parameters.
    #[error("invalid parameters: {0:?}")]
    Params(Vec<ParamProblem>),
    /// Model validation failures, as full messages (`Name can't be blank`).
    #[error("validation failed: {0:?}")]
    Validation(Vec<String>),
    /// Validation failures keyed by attribute, as GitLab renders them for projects.
    #[error("validation failed: {0:?}")]
    AttributeValidation(Vec<(String, Vec<String>)>),
    /// A single-message refusal.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A limit is reached (`An agent can have only two active tokens at a time`).
    #[error("limit reached: {0}")]
    LimitReached(String),
    /// A unique constraint refused the write; the domain layer words it for the client.
    #[error("conflict")]
    Conflict,
    /// A resource that already exists, with GitLab's message (`Member already exists`).
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// `If-Unmodified-Since` is older than the resource.
    #[error("precondition failed")]
    PreconditionFailed,
    /// The request body is larger than allowed.
    #[error("payload too large")]
    PayloadTooLarge,
    /// The request body did not arrive within the body timeout.
    #[error("the request body was not received in time")]
    RequestTimeout,
    /// The request body's content type is not accepted.
    #[error("unsupported media type")]
    UnsupportedMediaType,
    /// The request body is not valid JSON.
    #[error("malformed JSON body")]
    MalformedJson,
    /// The path, the query or the body holds a NUL byte or invalid UTF-8.
    #[error("the request holds a NUL byte or invalid UTF-8")]
    MalformedString,
    /// The store cannot be reached right now.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A bug or an unexpected failure; the detail goes to the log only.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Shorthand for domain results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A single parameter problem.
    pub fn param(problem: ParamProblem) -> Self {
        Self::Params(vec![problem])
    }

    /// A single model validation message.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::Validation(vec![message.into()])
    }
}

/// The one place a store error becomes a domain error. What reaches a client is decided from
/// the result by [`crate::respond`]; the causes go to the log only.
impl From<crate::store::Error> for Error {
    fn from(error: crate::store::Error) -> Self {
        use crate::store::Error as Store;
        match error {
            Store::NotFound => Self::NotFound(Missing::Record),
            Store::Conflict(_) => Self::Conflict,
            Store::Unavailable(cause) => Self::Unavailable(cause.to_string()),
            // A domain error raised inside a store transaction (sealing a secret) comes back
            // as it was.
            Store::Other(cause) => match cause.downcast::<Self>() {
                Ok(domain) => *domain,
                Err(cause) => Self::Internal(cause.to_string()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store;

    #[test]
    fn store_errors_map_to_what_clients_saw_before() {
        assert_eq!(
            Error::from(store::Error::NotFound),
            Error::NotFound(Missing::Record)
        );
        let unique = sqlx::Error::Protocol("stand-in for a unique violation".into());
        assert_eq!(Error::from(store::Error::Conflict(unique)), Error::Conflict);
        // The cause logged is the database's own words, as before.
        assert_eq!(
            Error::from(store::Error::Unavailable(sqlx::Error::PoolTimedOut)),
            Error::Unavailable(sqlx::Error::PoolTimedOut.to_string())
        );
        assert_eq!(
            Error::from(store::Error::other("stored token status \"x\"")),
            Error::Internal("stored token status \"x\"".into())
        );
        // A domain error raised inside a store transaction is not turned into another.
        let sealing = Error::Internal("no active key".into());
        assert_eq!(Error::from(store::Error::other(sealing.clone())), sealing);
    }
}
