//! A runner's run state. Pausing, failing and replaying overlap: a paused replay resumes
//! as a replay, and a failed plugin that was paused stays paused once a new version
//! recovers it. One enum holds exactly those combinations.

use super::replay::Replay;
use super::status::RunState;

#[derive(Debug)]
pub enum Lifecycle {
    /// Reading new events.
    Running,
    /// Reading events again, up to where the replay began.
    Replaying(Replay),
    /// Told to pause; a replay under way goes on when resumed.
    Paused { replay: Option<Replay> },
    /// Stopped by errors until a new version, a promotion or a replay. `paused` when it was
    /// also told to pause, which outlasts the failure.
    Failed { replay: Option<Replay>, paused: bool },
}

use Lifecycle::{Failed, Paused, Replaying, Running};

/// Reading, with or without a replay under way.
fn reading(replay: Option<Replay>) -> Lifecycle {
    replay.map_or(Running, Replaying)
}

impl Lifecycle {
    pub fn state(&self) -> RunState {
        match self {
            Running => RunState::Running,
            Replaying(_) => RunState::Replaying,
            Paused { .. } => RunState::Paused,
            Failed { .. } => RunState::Failed,
        }
    }

    /// Whether the runner reads and handles events now.
    pub fn is_reading(&self) -> bool {
        matches!(self, Running | Replaying(_))
    }

    /// The replay being read, if the runner is replaying.
    pub fn replaying(&self) -> Option<&Replay> {
        match self {
            Replaying(replay) => Some(replay),
            _ => None,
        }
    }

    /// The replay under way, also while paused or failed.
    pub fn any_replay(&self) -> Option<&Replay> {
        match self {
            Replaying(replay) | Paused { replay: Some(replay) } | Failed { replay: Some(replay), .. } => Some(replay),
            _ => None,
        }
    }

    fn change(&mut self, f: impl FnOnce(Lifecycle) -> Lifecycle) {
        let old = std::mem::replace(self, Running);
        *self = f(old);
    }

    pub fn pause(&mut self) {
        self.change(|old| match old {
            Running => Paused { replay: None },
            Replaying(replay) => Paused { replay: Some(replay) },
            Failed { replay, .. } => Failed { replay, paused: true },
            paused @ Paused { .. } => paused,
        });
    }

    pub fn resume(&mut self) {
        self.change(|old| match old {
            Paused { replay } => reading(replay),
            Failed { replay, .. } => Failed { replay, paused: false },
            other => other,
        });
    }

    pub fn fail(&mut self) {
        self.change(|old| match old {
            Running => Failed { replay: None, paused: false },
            Replaying(replay) => Failed { replay: Some(replay), paused: false },
            Paused { replay } => Failed { replay, paused: true },
            failed @ Failed { .. } => failed,
        });
    }

    /// A new version clears a failure; a pause stays.
    pub fn recover(&mut self) {
        self.change(|old| match old {
            Failed { replay, paused: true } => Paused { replay },
            Failed { replay, paused: false } => reading(replay),
            other => other,
        });
    }

    /// Replay `replay` once reading (now, or when paused or failed no longer).
    pub fn set_replay(&mut self, replay: Replay) {
        self.change(|old| match old {
            Running | Replaying(_) => Replaying(replay),
            Paused { .. } => Paused { replay: Some(replay) },
            Failed { paused, .. } => Failed { replay: Some(replay), paused },
        });
    }

    /// A replay asked for starts at once, whatever the runner was doing.
    pub fn start_replay(&mut self, replay: Replay) {
        *self = Replaying(replay);
    }

    pub fn finish_replay(&mut self) {
        if let Replaying(_) = self {
            *self = Running;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::runner::offsets::Offsets;

    fn replay() -> Replay {
        Replay::new(Offsets::default())
    }

    /// The state shown after each step, starting from `lifecycle`.
    fn walk(mut lifecycle: Lifecycle, steps: &[fn(&mut Lifecycle)]) -> Vec<RunState> {
        steps
            .iter()
            .map(|step| {
                step(&mut lifecycle);
                lifecycle.state()
            })
            .collect()
    }

    #[test]
    fn a_paused_replay_resumes_as_a_replay() {
        let states = walk(Replaying(replay()), &[Lifecycle::pause, Lifecycle::resume]);
        assert_eq!(states, [RunState::Paused, RunState::Replaying]);
    }

    #[test]
    fn a_failure_shows_over_a_pause_and_the_pause_outlasts_it() {
        let steps = [Lifecycle::fail, Lifecycle::pause, Lifecycle::recover, Lifecycle::resume];
        let states = walk(Running, &steps);
        assert_eq!(states, [RunState::Failed, RunState::Failed, RunState::Paused, RunState::Running]);
    }

    #[test]
    fn resuming_does_not_clear_a_failure_but_a_replay_does() {
        let steps = [
            Lifecycle::fail,
            Lifecycle::resume,
            |l: &mut Lifecycle| l.start_replay(replay()),
            Lifecycle::finish_replay,
        ];
        let states = walk(Running, &steps);
        assert_eq!(states, [RunState::Failed, RunState::Failed, RunState::Replaying, RunState::Running]);
    }
}
