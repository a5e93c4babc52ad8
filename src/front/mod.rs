//! The socket front end: the accept loop (`server`), one connection (`session`) and
//! the order of its answers (`sequencer`); it forwards every request to the ops.

pub mod sequencer;
pub mod server;
pub mod session;
