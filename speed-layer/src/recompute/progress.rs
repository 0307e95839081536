//! What a running recompute shows, and its throttle.
//!
//! On a terminal: indicatif bars, one for the events (done, rate, ETA), one line for the
//! archive (files and rows read) and one for Kafka (lag per partition to the live layer's
//! commit, the largest first). A 10-hour job is watched for hours, so the ETA must be there
//! at a glance; the lag line says which partition holds the end back.
//!
//! Elsewhere (a log shipper, CI, `2>file`) indicatif draws nothing, so the same figures go to
//! the log every [`LOG_EVERY`], as one structured line.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use pulse_service::Shutdown;

use super::plan::Plan;

/// How often the figures go to the log when no bar is drawn.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Partitions named on the Kafka line; the rest are summed.
const LAG_SHOWN: usize = 4;

pub struct Progress {
    pub started: Instant,
    total: u64,
    done: u64,
    max_rate: u64,
    files: (u64, u64),
    rows: u64,
    /// Per partition read from Kafka: (next offset to fold, bound).
    kafka: BTreeMap<i32, (i64, i64)>,
    bars: Option<Bars>,
    last_log: Instant,
}

struct Bars {
    /// Kept so the lines stay drawn together.
    _multi: MultiProgress,
    events: ProgressBar,
    archive: ProgressBar,
    kafka: ProgressBar,
}

impl Progress {
    /// For `plan`, throttled to `max_rate` events per second (0: no limit); bars when stderr
    /// is a terminal.
    pub fn new(plan: &Plan, max_rate: u64) -> Self {
        let total = plan.offsets().max(0) as u64;
        let files = plan
            .partitions
            .iter()
            .flat_map(|p| &p.units)
            .map(|u| u.all_files().count() as u64)
            .sum();
        let kafka = plan
            .partitions
            .iter()
            .filter(|p| p.kafka_offsets() > 0)
            .map(|p| (p.partition, (p.kafka_from, p.bound)))
            .collect();
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4));
        let bars = (!multi.is_hidden()).then(|| Bars::new(multi, total));
        let progress = Self {
            started: Instant::now(),
            total,
            done: 0,
            max_rate,
            files: (0, files),
            rows: 0,
            kafka,
            bars,
            last_log: Instant::now(),
        };
        progress.draw_lines();
        progress
    }

    /// Events per load-and-fold step: `chunk`, or a quarter second's worth under a
    /// `--max-events-per-sec` limit, so that the throttle's waits stay short and flushes
    /// (and commits) come at their interval.
    pub fn chunk(&self, chunk: usize) -> usize {
        match self.max_rate {
            0 => chunk,
            rate => (rate as usize / 4).clamp(100, chunk),
        }
    }

    /// One archive file read, with `rows` rows.
    pub fn file_read(&mut self, rows: usize) {
        self.files.0 += 1;
        self.rows += rows as u64;
    }

    /// Partition `p` of Kafka folded up to `offset`.
    pub fn kafka_at(&mut self, p: i32, offset: i64) {
        if let Some((next, _)) = self.kafka.get_mut(&p) {
            *next = offset + 1;
        }
    }

    /// Partition `p` of Kafka read to its bound.
    pub fn kafka_done(&mut self, p: i32) {
        if let Some((next, bound)) = self.kafka.get_mut(&p) {
            *next = *bound;
        }
    }

    /// `n` more events folded: waits as the throttle asks, then shows or logs the figures.
    pub fn advance(&mut self, n: u64, stop: &Shutdown) {
        self.done += n;
        let elapsed = self.started.elapsed().as_secs_f64();
        if self.max_rate > 0 {
            let due = self.done as f64 / self.max_rate as f64;
            if due > elapsed {
                stop.sleep_blocking(Duration::from_secs_f64(due - elapsed));
            }
        }
        match &self.bars {
            Some(bars) => {
                bars.events.set_position(self.done);
                self.draw_lines();
            }
            None if self.last_log.elapsed() >= LOG_EVERY => {
                self.last_log = Instant::now();
                let rate = self.done as f64 / elapsed.max(1e-9);
                let left = self.total.saturating_sub(self.done) as f64 / rate.max(1e-9);
                tracing::info!(
                    done = self.done,
                    total = self.total,
                    rate = format!("{rate:.0}/s"),
                    eta = format!("{left:.0} s"),
                    archive = self.archive_line(),
                    kafka = self.kafka_line(),
                    "recompute progress"
                );
            }
            None => {}
        }
    }

    /// Takes the bars off the terminal (the summary follows them).
    pub fn finish(&self) {
        if let Some(bars) = &self.bars {
            bars.events.finish_and_clear();
            bars.archive.finish_and_clear();
            bars.kafka.finish_and_clear();
        }
    }

    fn draw_lines(&self) {
        if let Some(bars) = &self.bars {
            bars.archive.set_message(self.archive_line());
            bars.kafka.set_message(self.kafka_line());
        }
    }

    fn archive_line(&self) -> String {
        format!(
            "archive: {}/{} files, {} rows",
            self.files.0, self.files.1, self.rows
        )
    }

    fn kafka_line(&self) -> String {
        lag_line(&self.kafka)
    }
}

/// "kafka: lag p3 1204, p0 880, +2 partitions 95; 6/10 partitions done".
fn lag_line(partitions: &BTreeMap<i32, (i64, i64)>) -> String {
    if partitions.is_empty() {
        return "kafka: nothing to read (the archive reaches the live layer's commit)".into();
    }
    let mut lags: Vec<(i64, i32)> = partitions
        .iter()
        .map(|(p, (next, bound))| ((bound - next).max(0), *p))
        .filter(|(lag, _)| *lag > 0)
        .collect();
    lags.sort_by(|a, b| b.cmp(a));
    let done = partitions.len() - lags.len();
    let mut parts: Vec<String> = lags
        .iter()
        .take(LAG_SHOWN)
        .map(|(lag, p)| format!("p{p} {lag}"))
        .collect();
    if lags.len() > LAG_SHOWN {
        let rest: i64 = lags[LAG_SHOWN..].iter().map(|(lag, _)| lag).sum();
        parts.push(format!("+{} partitions {rest}", lags.len() - LAG_SHOWN));
    }
    let total = partitions.len();
    match parts.is_empty() {
        true => format!("kafka: {done}/{total} partitions done"),
        false => format!(
            "kafka: lag {}; {done}/{total} partitions done",
            parts.join(", ")
        ),
    }
}

impl Bars {
    fn new(multi: MultiProgress, total: u64) -> Self {
        let events = multi.add(ProgressBar::new(total));
        // A template is checked when parsed; these are constants, so a bad one is a bug
        // that the unit test below meets first.
        if let Ok(style) = ProgressStyle::with_template(EVENTS_TEMPLATE) {
            events.set_style(style.progress_chars("=> "));
        }
        let line = |multi: &MultiProgress| {
            let bar = multi.add(ProgressBar::new_spinner());
            if let Ok(style) = ProgressStyle::with_template(LINE_TEMPLATE) {
                bar.set_style(style);
            }
            bar
        };
        let (archive, kafka) = (line(&multi), line(&multi));
        Self {
            _multi: multi,
            events,
            archive,
            kafka,
        }
    }
}

const EVENTS_TEMPLATE: &str =
    "recompute [{elapsed_precise}] [{bar:32}] {human_pos}/{human_len} events  {per_sec}  ETA {eta}";
const LINE_TEMPLATE: &str = "  {msg}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_templates_parse() {
        assert!(ProgressStyle::with_template(EVENTS_TEMPLATE).is_ok());
        assert!(ProgressStyle::with_template(LINE_TEMPLATE).is_ok());
    }

    #[test]
    fn the_lag_line_names_the_partitions_furthest_behind_first() {
        let partitions: BTreeMap<i32, (i64, i64)> = [
            (0, (100, 980)),
            (1, (50, 50)),
            (2, (10, 1214)),
            (3, (0, 5)),
            (4, (0, 6)),
            (5, (0, 7)),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            lag_line(&partitions),
            "kafka: lag p2 1204, p0 880, p5 7, p4 6, +1 partitions 5; 1/6 partitions done"
        );
        let done: BTreeMap<i32, (i64, i64)> = [(0, (9, 9))].into_iter().collect();
        assert_eq!(lag_line(&done), "kafka: 1/1 partitions done");
        assert!(lag_line(&BTreeMap::new()).contains("nothing to read"));
    }
}
