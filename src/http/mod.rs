//! HTTP: the lean HTTP/1.1 connection loop ([`conn`]), routing, CORS, and
//! the one place errors become statuses ([`ApiError`]).

pub(crate) mod conn;
mod cors;
mod error;
mod routes;

pub use error::ApiError;
pub(crate) use error::{stream_response, text};
pub use routes::MAX_EXTENSION_BODY;
pub(crate) use routes::handle;
