//! The data-loading side: batch assembly ([`produce`]), the `loader run` producer daemon and
//! `loader status` ([`daemon`]), and ring tools: `loader tap`, `loader bench-ring` ([`ring_tools`]).

pub mod daemon;
pub mod produce;
pub mod ring_tools;
