//! The one domain error type, and the one table that turns it into what a client sees.

use http::StatusCode;
use serde_json::{Value, json};

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
    fn message(&self) -> String {
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
    /// A `read_api` token tried to write.
    #[error("insufficient scope")]
    InsufficientScope,
    /// The caller's role is too low for the operation.
    #[error("forbidden")]
    Forbidden,
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

/// What a client sees for an error.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    /// HTTP status.
    pub status: StatusCode,
    /// GitLab-shaped JSON body; a JSON string when [`Reply::plain_text`] is set.
    pub body: Value,
    /// Sent as `text/plain` (the string in `body`) rather than JSON, as GitLab's middleware does.
    pub plain_text: bool,
}

impl Error {
    /// A single parameter problem.
    pub fn param(problem: ParamProblem) -> Self {
        Self::Params(vec![problem])
    }

    /// A single model validation message.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::Validation(vec![message.into()])
    }

    /// The table: status code and body for every error.
    pub fn reply(&self) -> Reply {
        let (status, body) = match self {
            // GitLab's `HandleMalformedStrings` Rack middleware answers before Grape, in plain
            // text. Refusing these keeps NUL out of the store: PostgreSQL rejects it in text
            // columns and SQLite would keep it, so both backends now agree.
            Self::MalformedString => (StatusCode::BAD_REQUEST, json!("Bad Request")),
            Self::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                json!({"message": "401 Unauthorized"}),
            ),
            Self::InsufficientScope => (
                StatusCode::FORBIDDEN,
                json!({
                    "error": "insufficient_scope",
                    "error_description": "The request requires higher privileges than provided by the access token.",
                    "scope": "api",
                }),
            ),
            Self::Forbidden => (StatusCode::FORBIDDEN, json!({"message": "403 Forbidden"})),
            Self::NotFound(missing) => {
                let message = match missing {
                    Missing::Project => "404 Project Not Found",
                    Missing::ClusterAgents => "404 ClusterAgents Not Found",
                    Missing::User => "404 User Not Found",
                    Missing::Member => "404 Member Not Found",
                    Missing::Record => "404 Not found",
                    Missing::Resource => "404 Not Found",
                };
                (StatusCode::NOT_FOUND, json!({"message": message}))
            }
            Self::Params(problems) => {
                let joined = problems
                    .iter()
                    .map(ParamProblem::message)
                    .collect::<Vec<_>>()
                    .join(", ");
                (StatusCode::BAD_REQUEST, json!({"error": joined}))
            }
            Self::Validation(messages) => (
                StatusCode::BAD_REQUEST,
                json!({"message": format!("400 Bad request - {}", ruby_array(messages))}),
            ),
            Self::AttributeValidation(fields) => {
                let map = fields
                    .iter()
                    .map(|(field, messages)| (field.clone(), json!(messages)))
                    .collect::<serde_json::Map<_, _>>();
                (StatusCode::BAD_REQUEST, json!({"message": map}))
            }
            Self::BadRequest(message) | Self::LimitReached(message) => (
                StatusCode::BAD_REQUEST,
                json!({"message": format!("400 Bad request - {message}")}),
            ),
            Self::Conflict => (StatusCode::CONFLICT, json!({"message": "409 Conflict"})),
            Self::AlreadyExists(message) => (StatusCode::CONFLICT, json!({"message": message})),
            Self::PreconditionFailed => (
                StatusCode::PRECONDITION_FAILED,
                json!({"message": "412 Precondition Failed"}),
            ),
            Self::PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"message": "413 Request Entity Too Large"}),
            ),
            Self::RequestTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                json!({"message": "408 Request Timeout"}),
            ),
            // Grape's body names the client's content type; a fixed one, shaped like the
            // 404 and 405 fallbacks, never reflects what a client sent.
            Self::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                json!({"error": "415 Unsupported Media Type"}),
            ),
            Self::MalformedJson => (
                StatusCode::BAD_REQUEST,
                json!({"error": "The request body is not valid JSON"}),
            ),
            Self::Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"message": "503 Service Unavailable"}),
            ),
            Self::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"message": "500 Internal Server Error"}),
            ),
        };
        Reply {
            status,
            body,
            plain_text: matches!(self, Self::MalformedString),
        }
    }
}

impl Error {
    /// The same table for gRPC: a status code and a message. Validation messages are the
    /// REST API's, joined with ", "; causes of internal errors stay in the log.
    pub fn grpc(&self) -> (tonic::Code, String) {
        use tonic::Code;
        match self {
            Self::Unauthorized => (Code::Unauthenticated, "unauthenticated".into()),
            Self::InsufficientScope | Self::Forbidden => {
                (Code::PermissionDenied, "permission denied".into())
            }
            Self::NotFound(_) => {
                let body = self.reply().body;
                let message = body["message"].as_str().unwrap_or("404 Not Found");
                (
                    Code::NotFound,
                    message.trim_start_matches("404 ").to_owned(),
                )
            }
            Self::Params(problems) => (
                Code::InvalidArgument,
                problems
                    .iter()
                    .map(ParamProblem::message)
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            Self::Validation(messages) => (Code::InvalidArgument, messages.join(", ")),
            Self::AttributeValidation(fields) => (
                Code::InvalidArgument,
                fields
                    .iter()
                    .map(|(field, messages)| format!("{field} {}", messages.join(", ")))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            Self::BadRequest(message) => (Code::InvalidArgument, message.clone()),
            Self::RequestTimeout => (Code::DeadlineExceeded, self.to_string()),
            Self::MalformedJson
            | Self::PayloadTooLarge
            | Self::UnsupportedMediaType
            | Self::MalformedString => (Code::InvalidArgument, self.to_string()),
            Self::LimitReached(message) => (Code::FailedPrecondition, message.clone()),
            Self::PreconditionFailed => (Code::FailedPrecondition, "precondition failed".into()),
            Self::Conflict => (Code::AlreadyExists, "already exists".into()),
            Self::AlreadyExists(message) => (Code::AlreadyExists, message.clone()),
            Self::Unavailable(_) => (Code::Unavailable, "the database is unavailable".into()),
            Self::Internal(_) => (Code::Internal, "internal error".into()),
        }
    }
}

/// Renders messages as Ruby's `Array#to_s` does: `["a", "b"]`.
fn ruby_array(messages: &[String]) -> String {
    let items = messages
        .iter()
        .map(|m| serde_json::to_string(m).unwrap_or_default())
        .collect::<Vec<_>>()
        .join(", ");
    format!("[{items}]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_messages_render_as_a_ruby_array() {
        let reply = Error::invalid("Name has already been taken").reply();
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            reply.body.to_string(),
            r#"{"message":"400 Bad request - [\"Name has already been taken\"]"}"#
        );
    }

    #[test]
    fn parameter_problems_join_with_commas() {
        let reply = Error::Params(vec![
            ParamProblem::Missing("name".into()),
            ParamProblem::Invalid("agent_id".into()),
        ])
        .reply();
        assert_eq!(
            reply.body,
            json!({"error": "name is missing, agent_id is invalid"})
        );
    }

    #[test]
    fn malformed_strings_are_plain_text_bad_requests() {
        let error = Error::MalformedString;
        let reply = error.reply();
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        assert!(reply.plain_text);
        assert_eq!(reply.body, json!("Bad Request"));
        assert_eq!(error.grpc().0, tonic::Code::InvalidArgument);
        assert!(!Error::MalformedJson.reply().plain_text);
    }

    #[test]
    fn internal_errors_hide_their_cause() {
        let reply = Error::Internal("disk on fire".into()).reply();
        assert_eq!(reply.body, json!({"message": "500 Internal Server Error"}));
    }
}
