//! Measuring tools (cargo feature `bench`): the history-length sweep of `illmrec bench --sweep`
//! with its tables and plot, and the synthetic catalog of `illmrec bench-catalog`. They measure;
//! they neither print nor assert anything about time.

pub mod report;
pub mod sweep;
#[allow(unsafe_code)]
pub mod synthetic;
