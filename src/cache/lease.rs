//! How a fill takes back the connection it lent to a range's own upstream
//! fetch (a viewer who skipped ahead): a fill that lent its host's only
//! connection to a seek while nobody read it needs that connection again
//! as soon as a reader waits for its next bytes ([`super::Entry::lend`]) —
//! also while the seek's own client is not reading (a paused player), when
//! nothing on the seek's request path runs. So the fetch is read by a task
//! of its own (`crate::proxy::source`), which drops it when told here.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

/// Tells a range's fetch that the fill took its connection back.
#[derive(Default)]
pub struct Lease {
    taken: AtomicBool,
    taking: Notify,
}

impl Lease {
    /// Whether the fill took the connection back.
    pub fn is_taken(&self) -> bool {
        self.taken.load(Ordering::Acquire)
    }

    /// Done when the fill takes the connection back (enable it before
    /// looking at [`Lease::is_taken`]).
    pub fn taking(&self) -> tokio::sync::futures::Notified<'_> {
        self.taking.notified()
    }

    /// Takes the connection back: the fetch lets it go (closed, its slot
    /// at the host's gate given back once the hoster has seen it close,
    /// and the object's [`super::AheadSlot`] with it), and its range reads
    /// on from the fill.
    pub fn take_back(&self) {
        self.taken.store(true, Ordering::Release);
        self.taking.notify_waiters();
    }
}
