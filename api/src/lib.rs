//! `prebuilds-api`: the HTTP API of the prebuilds service, for the portals, IDE plugins and
//! scripts of platform teams. Stateless and horizontally scalable: every request is answered from
//! PostgreSQL and the claim RPC, so any replica answers any request.
//!
//! Modules: [`config`] (flags and variables), [`app`] (wiring, limits, metrics, shutdown),
//! [`routes`] (the endpoints, each declared once with its role and documentation), [`auth`]
//! (bearer tokens and roles), [`problem`] (RFC 9457 errors), [`openapi`] (the OpenAPI 3.1
//! document, generated from [`routes::endpoints`] and the Rust types).

pub mod app;
pub mod auth;
pub mod config;
pub mod openapi;
pub mod problem;
pub mod routes;
