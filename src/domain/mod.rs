//! The domain: entities, rules and operations, independent of HTTP, gRPC and SQL.

mod destinations;
mod error;
pub mod last_used;
mod model;
mod service;
mod sessions;
pub mod token_lookups;
pub mod validate;

pub use crate::store::{TokenFilter, UserFilter, UserOrder};
pub use destinations::{DENIED_NETWORKS_SETTING, DeniedNetworks};
pub use error::{Error, Missing, ParamProblem, Result};
pub use model::*;
pub use service::{
    AGENT_TOKEN_LIMIT, AgentRefusal, Caller, DialCredentials, Intent, MAX_PEM_LEN, MAX_URL_LEN,
    NewProjectInput, NewTokenInput, NewUserInput, ProxyAccess, Service, Settings,
    UrlConfigurationInput,
};
pub use sessions::{
    AgentMetadata, Connection, NoSessions, Phase, ProxyUser, RequestError, SessionResponse,
    Sessions,
};
