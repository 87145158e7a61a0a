//! Simulated receptive agents, for tests, benchmarks and connectivity checks: the agent's own
//! server ([`crate::agent::server`]) under the names the tests know, usually without an
//! upstream.

pub use crate::agent::server::{
    AgentConfig as AgentSimConfig, AgentEvents as SimEvents, AgentServer as AgentSim,
};
