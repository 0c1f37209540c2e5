//! The thin MoE runtime on top of m2n. Today: [`plan`], the deployment
//! planner of MegaScale-Infer (performance model and plan search).

pub mod plan;
