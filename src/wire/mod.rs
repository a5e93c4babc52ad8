//! The wire format: request lines parsed and answers encoded (`protocol`), the
//! catalog of ops and their rules (`catalog`), and the JSON-lines client.

pub mod catalog;
pub mod client;
pub mod protocol;
