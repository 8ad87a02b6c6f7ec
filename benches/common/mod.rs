//! What the bench binaries share: their run length and their CSV output
//! (read by `scripts/bench-report.py`).

use std::io::Write;

/// `DSYNC_BENCH_SECS`, or `default`.
pub fn seconds(default: u64) -> u64 {
    std::env::var("DSYNC_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Appends `rows` to the CSV file named by `DSYNC_BENCH_CSV`, if set.
pub fn append_csv(rows: &[String]) {
    let Ok(path) = std::env::var("DSYNC_BENCH_CSV") else {
        return;
    };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open the CSV file");
    for row in rows {
        writeln!(file, "{row}").expect("write the CSV file");
    }
}
