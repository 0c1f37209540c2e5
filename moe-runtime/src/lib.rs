//! The thin MoE runtime on top of m2n: the model and its reference decoder
//! ([`model`]), attention and expert workers joined by one m2n
//! communicator with the ping-pong pipeline ([`worker`]), process launch
//! ([`launch`]), and the deployment planner of MegaScale-Infer ([`plan`]).

pub mod bench;
pub mod launch;
pub mod model;
pub mod plan;
pub mod serve;
pub mod worker;
