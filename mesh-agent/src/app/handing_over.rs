//! Readiness while new agents talk to this one.
//!
//! With host networking the readiness port is one socket, passed from
//! agent to agent: kubelet's probe of a new agent's pod may be answered
//! by the old agent. Were the old one to say "ready" then, the new pod
//! would count as ready, and the old one be told to stop, before the new
//! agent serves, and possibly in the middle of the handover. So from the
//! moment a new agent connects until it has failed (or taken over for
//! good), this agent's readiness says no; and from the moment it is told
//! to stop.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicUsize, Ordering},
};

/// New agents in conversation with this one.
#[derive(Clone)]
pub struct Conversations {
    open: Arc<AtomicUsize>,
    ready: Arc<AtomicBool>,
    stopping: Arc<AtomicBool>,
}

impl Conversations {
    /// Conversations that turn `ready` (what readiness answers) off.
    pub fn new(ready: Arc<AtomicBool>) -> Self {
        Self {
            open: Arc::default(),
            ready,
            stopping: Arc::default(),
        }
    }

    /// Told to stop: not ready again, whatever becomes of the
    /// conversations.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        self.ready.store(false, Ordering::Release);
    }

    /// A new agent connected: not ready until it is gone or the
    /// conversation ends in a handover.
    pub fn begin(&self) -> Conversation {
        self.open.fetch_add(1, Ordering::AcqRel);
        self.ready.store(false, Ordering::Release);
        Conversation {
            conversations: self.clone(),
            handed_over: false,
        }
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// One new agent's conversation; ready again when the last one ends
/// without a handover.
pub struct Conversation {
    conversations: Conversations,
    handed_over: bool,
}

impl Conversation {
    /// The new agent took over: this agent stays not ready.
    pub fn handed_over(mut self) {
        self.handed_over = true;
    }
}

impl Drop for Conversation {
    fn drop(&mut self) {
        let left = self.conversations.open.fetch_sub(1, Ordering::AcqRel) - 1;
        if left == 0 && !self.handed_over && !self.conversations.stopping.load(Ordering::Acquire) {
            self.conversations.ready.store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_ready_while_any_new_agent_talks_and_after_a_handover() {
        let ready = Arc::new(AtomicBool::new(true));
        let conversations = Conversations::new(ready.clone());
        let first = conversations.begin();
        let second = conversations.begin();
        assert!(!ready.load(Ordering::Acquire));
        drop(first);
        assert!(!ready.load(Ordering::Acquire), "one still talks");
        drop(second);
        assert!(ready.load(Ordering::Acquire), "both gave up");
        conversations.begin().handed_over();
        assert!(!ready.load(Ordering::Acquire));
        assert_eq!(conversations.open(), 0);
    }

    #[test]
    fn not_ready_again_once_told_to_stop() {
        let ready = Arc::new(AtomicBool::new(true));
        let conversations = Conversations::new(ready.clone());
        let talking = conversations.begin();
        conversations.stop();
        drop(talking);
        assert!(!ready.load(Ordering::Acquire));
    }
}
