//! How fast a fill brings its body now: what tells a range far ahead of
//! the fill (which may go upstream alone) from one the fill brings within
//! a moment (which waits for it).
//!
//! The average since the header is not it. Hosters open with a burst and
//! then trickle (nginx's `limit_rate_after 8m; limit_rate 512k`; and any
//! origin fills the socket buffers at once): a second into such a fill
//! its average says 8 MB a second, and a seek 6 MB ahead waited 11.6 s for
//! bytes it was told were under a second away; ffmpeg seeking 25 s into an
//! MP4 just opened waited 18 s. A fill that stalls keeps its average too.
//! So the pace is read over the last moments only, the opening (the body's
//! first quarter second) left out, and a stall slows it down as it lasts.
//! Until that pace is known, a range that even the pace since the header,
//! burst and all, would not bring soon is far at once (an MP4's index at
//! its end); one that it would asks again shortly (the pace is known under
//! a second into the body).

use std::time::{Duration, Instant};

/// The opening's length (its bytes set no pace), and how far apart the
/// marks are taken: the pace is read over the last quarter to half second
/// (longer while the fill stalls, as no byte moves the marks on).
const STEP: Duration = Duration::from_millis(250);

/// When the body's first bytes came, and marks of (time, body bytes
/// written) taken after the opening, the newer one last.
#[derive(Debug, Default)]
pub(super) struct Pace {
    opened: Option<Instant>,
    marks: [Option<(Instant, u64)>; 2],
}

impl Pace {
    /// The fill has written `written` bytes by `now`.
    pub fn wrote(&mut self, now: Instant, written: u64) {
        let Some(opened) = self.opened else {
            self.opened = Some(now);
            return;
        };
        let after = |at: Instant| now.saturating_duration_since(at) >= STEP;
        if after(opened) && self.marks[1].is_none_or(|(at, _)| after(at)) {
            self.marks = [self.marks[1], Some((now, written))];
        }
    }

    /// Whether `gap` more bytes than the `written` ones come within
    /// `patience` as of `now`, for a fill whose header came at `since`: at
    /// the pace since the older mark, once a mark is a [`STEP`] old.
    /// Before that, `Some(false)` when even the pace since the header (the
    /// opening's burst counted in) would not bring them, and `None`, too
    /// early to tell, when it would: for at most three steps into the body
    /// (a fill that wrote nothing after its opening is `Some(false)` after
    /// two).
    pub fn brings(&self, since: Instant, now: Instant, written: u64, gap: u64, patience: Duration) -> Option<bool> {
        if gap == 0 {
            return Some(true);
        }
        let age = |at: Instant| now.saturating_duration_since(at);
        if let [Some((at, had)), _] | [None, Some((at, had))] = self.marks {
            if age(at) >= STEP {
                return Some(soon(gap, written.saturating_sub(had), age(at), patience));
            }
        }
        // The header's first moments count as a tenth of a second.
        if !soon(gap, written, age(since).max(Duration::from_millis(100)), patience) {
            return Some(false);
        }
        let learning = match (self.opened, self.marks[1]) {
            (Some(_), Some(_)) => true,
            (Some(opened), None) => age(opened) < 2 * STEP,
            (None, _) => false,
        };
        (!learning).then_some(false)
    }
}

/// Whether `gap` more bytes come within `patience` from a fill that wrote
/// `bytes` in `over` (not zero).
fn soon(gap: u64, bytes: u64, over: Duration, patience: Duration) -> bool {
    let rate = bytes as f64 / over.as_secs_f64();
    gap as f64 <= rate * patience.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATIENCE: Duration = Duration::from_secs(1);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A fill that opened at `t0` with `burst` bytes at once, then wrote
    /// `rate` bytes a second for `secs`, a piece each 100 ms (as 64 KiB
    /// pieces at ~650 KB/s come): its pace, bytes written and the time.
    fn fill(t0: Instant, burst: u64, rate: u64, secs: f64) -> (Pace, u64, Instant) {
        let mut pace = Pace::default();
        let mut written = 64 << 10;
        pace.wrote(t0, written);
        written += burst;
        pace.wrote(t0 + ms(5), written);
        let ticks = (secs * 10.0) as u64;
        for i in 1..=ticks {
            written += rate / 10;
            pace.wrote(t0 + ms(100 * i), written);
        }
        (pace, written, t0 + ms(100 * ticks))
    }

    #[test]
    fn a_burst_then_a_trickle_is_read_at_the_trickles_pace() {
        let t0 = Instant::now();
        // nginx's `limit_rate_after 8m; limit_rate 512k`, one second in.
        let (pace, written, now) = fill(t0, 8 << 20, 512 << 10, 1.0);
        let brings = |gap| pace.brings(t0, now, written, gap, PATIENCE);
        assert_eq!(brings(6 << 20), Some(false), "6 MB ahead is 12 s away, not under one");
        assert_eq!(brings(400 << 10), Some(true), "400 KB ahead is under a second");
        assert_eq!(brings(600 << 10), Some(false));
        assert_eq!(brings(0), Some(true), "the next byte");
    }

    #[test]
    fn a_steady_fill_is_read_at_its_pace() {
        let t0 = Instant::now();
        let (pace, written, now) = fill(t0, 0, 2_000_000, 3.0);
        assert_eq!(pace.brings(t0, now, written, 1_900_000, PATIENCE), Some(true));
        assert_eq!(pace.brings(t0, now, written, 2_100_000, PATIENCE), Some(false));
    }

    #[test]
    fn a_stalled_fill_slows_down_as_it_stays_stalled() {
        let t0 = Instant::now();
        let (pace, written, now) = fill(t0, 0, 2_000_000, 3.0);
        // Nothing written for 4 s: the 600 KB since the older mark over 4.3 s.
        let later = now + Duration::from_secs(4);
        assert_eq!(pace.brings(t0, later, written, 139_000, PATIENCE), Some(true));
        assert_eq!(pace.brings(t0, later, written, 140_000, PATIENCE), Some(false));
    }

    #[test]
    fn the_opening_is_no_pace_and_the_wait_to_know_is_short() {
        let t0 = Instant::now();
        let (pace, written, _) = fill(t0, 8 << 20, 512 << 10, 0.2);
        // The burst and two pieces, no mark yet.
        assert_eq!(pace.brings(t0, t0 + ms(200), written, 1, PATIENCE), None);
        // Not soon even at the burst's pace: far, at once (an MP4's index at its end).
        assert_eq!(pace.brings(t0, t0 + ms(200), written, 100 << 20, PATIENCE), Some(false));
        let (pace, written, _) = fill(t0, 8 << 20, 512 << 10, 0.4);
        assert_eq!(pace.brings(t0, t0 + ms(400), written, 1, PATIENCE), None, "a mark at 300 ms");
        assert_eq!(pace.brings(t0, t0 + ms(550), written, 1, PATIENCE), Some(true));
        assert_eq!(pace.brings(t0, t0 + ms(550), written, 1 << 20, PATIENCE), Some(false));
        // Nothing after the opening.
        let (pace, written, _) = fill(t0, 8 << 20, 0, 0.0);
        assert_eq!(pace.brings(t0, t0 + ms(499), written, 1, PATIENCE), None);
        assert_eq!(pace.brings(t0, t0 + ms(500), written, 1, PATIENCE), Some(false));
        // Nothing written: no pace shown.
        assert_eq!(Pace::default().brings(t0, t0 + ms(100), 0, 1, PATIENCE), Some(false));
    }
}
