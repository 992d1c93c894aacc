//! Slack's protocols as flowcoach and its simulator speak them: the Socket Mode frames
//! ([`wire`], re-exported at the root) and the signature Slack puts on the requests it sends
//! to an app in HTTP mode ([`signature`]).

pub mod signature;
mod wire;

pub use wire::*;
