//! HTTP: the lean HTTP/1.1 connection loop ([`conn`]), routing, CORS, and
//! the one place errors become statuses ([`ApiError`]).

pub(crate) mod conn;
mod cors;
mod error;
mod routes;

pub(crate) use error::text;
pub use routes::MAX_EXTENSION_BODY;
pub(crate) use routes::handle;
