//! The one table from domain errors to what a client sees: for REST, the HTTP status and
//! GitLab's body, word for word; for gRPC, the status code and message. No other place
//! decides a status code, and the domain knows neither protocol.

use http::StatusCode;
use serde_json::{Value, json};

use crate::domain::{Error, Missing, ParamProblem};

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

/// What a domain error looks like on the wire.
pub trait Respond {
    /// The REST status and body.
    fn reply(&self) -> Reply;
    /// The gRPC code and message. Validation messages are the REST API's, joined with ", ";
    /// causes of internal errors stay in the log.
    fn grpc(&self) -> (tonic::Code, String);
}

impl Respond for Error {
    fn reply(&self) -> Reply {
        let (status, body) = match self {
            // GitLab's `HandleMalformedStrings` Rack middleware answers before Grape, in plain
            // text. Refusing these keeps NUL out of the store: PostgreSQL rejects it in text
            // columns and SQLite would keep it, so both backends now agree.
            Self::MalformedString => (StatusCode::BAD_REQUEST, json!("Bad Request")),
            Self::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                json!({"message": "401 Unauthorized"}),
            ),
            Self::InsufficientScope { scope } => (
                StatusCode::FORBIDDEN,
                json!({
                    "error": "insufficient_scope",
                    "error_description": "The request requires higher privileges than provided by the access token.",
                    "scope": scope,
                }),
            ),
            Self::Forbidden => (StatusCode::FORBIDDEN, json!({"message": "403 Forbidden"})),
            Self::ForbiddenBecause(reason) => (
                StatusCode::FORBIDDEN,
                json!({"message": format!("403 Forbidden - {reason}")}),
            ),
            Self::SudoUserNotFound(who) => (
                StatusCode::NOT_FOUND,
                json!({"message": format!("404 User with ID or username '{who}' Not Found")}),
            ),
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

    /// The same table for gRPC: a status code and a message. Validation messages are the
    /// REST API's, joined with ", "; causes of internal errors stay in the log.
    fn grpc(&self) -> (tonic::Code, String) {
        use tonic::Code;
        match self {
            Self::Unauthorized => (Code::Unauthenticated, "unauthenticated".into()),
            Self::InsufficientScope { .. } | Self::Forbidden | Self::ForbiddenBecause(_) => {
                (Code::PermissionDenied, "permission denied".into())
            }
            Self::NotFound(_) | Self::SudoUserNotFound(_) => {
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
    use crate::domain::ParamProblem;

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
