//! anibridge-proxy: a streaming HTTP video proxy on Pingora.
//!
//! Pure policy lives in small modules with unit tests ([`auth`], [`headers`],
//! [`content_type`], [`hls`], [`egress`], [`routing`], [`config`]); the
//! [`proxy`] module wires them into Pingora's `ProxyHttp`, and [`upstream`]
//! drives Pingora's connector and HTTP/1.1 client over this crate's
//! idle-connection pool.

// No unsafe code but two lines, allowed where they are: `proxy::sendfile`
// borrows the client socket's descriptor (which Pingora gives only as a
// number) to send a stored body with `sendfile`.
#![deny(unsafe_code)]
// The docs are for this crate's developers (`cargo doc --document-private-items`):
// module docs name the private modules and functions they are made of.
#![allow(rustdoc::private_intra_doc_links)]

pub mod access;
pub mod admin;
pub mod auth;
pub mod cache;
mod charclass;
pub mod config;
pub mod connections;
pub mod content_type;
pub mod cors;
pub mod dns;
pub mod egress;
pub mod gate;
pub mod header_guard;
pub mod headers;
pub mod hls;
pub mod hosts;
pub mod log_writer;
pub mod metrics;
pub mod providers;
pub mod proxy;
pub mod resolver;
pub mod routing;
pub mod server;
pub mod tunnel;
pub mod upstream;
