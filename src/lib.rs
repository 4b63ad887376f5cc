//! `tunnel`: a peer-to-peer HTTP tunnel over WebRTC data channels, and the signaling server that
//! introduces the peers. The binary (`src/main.rs`), the black-box tests and the fuzz targets all
//! use this library. Every protocol is a sans-IO core; each mode has one mio driver.

pub mod cli;
pub mod demo;
pub mod frame;
pub mod http1;
pub mod nbio;
pub mod peer;
pub mod prom;
pub mod service;
pub mod signal;
#[cfg(test)]
mod sim;
pub mod stop;
pub mod stun;
pub mod tunnel;
pub mod turn;
pub mod util;
