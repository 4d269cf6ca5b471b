//! Measuring tools (cargo feature `bench`): the history-length sweep of `illmrec bench --sweep`
//! with its tables and plot, the synthetic catalog of `illmrec bench-catalog`, and the model
//! comparison of `illmrec bench-models` ([`models`], [`agreement`]). They measure;
//! they neither print nor assert anything about time.

pub mod agreement;
pub mod models;
pub mod plot;
pub mod report;
pub mod sweep;
#[allow(unsafe_code)]
pub mod synthetic;
