//! kas-gateway: the GitLab side of receptive Kubernetes agents, as a standalone service.

pub mod agent;
pub mod agent_sim;
pub mod certs;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod crypto;
pub mod dialer;
pub mod domain;
pub mod grpc;
pub mod listener;
pub mod metrics;
pub mod observe;
pub mod ops;
pub mod proto;
pub mod respond;
pub mod rest;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
