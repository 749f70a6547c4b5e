//! HTTP: the lean HTTP/1.1 connection loop ([`conn`]), h2c on the same
//! port (`h2`), routing, CORS, and the one place errors become statuses
//! ([`ApiError`]).

pub(crate) mod conn;
mod cors;
mod error;
mod h2;
mod routes;

pub(crate) use error::text;
pub use routes::MAX_EXTENSION_BODY;
pub(crate) use routes::handle;
