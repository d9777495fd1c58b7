//! The in-memory stand-in for the host's `process` capability: a per-thread table of
//! "processes" that never run. Each stays running until a test ends it
//! ([`set_process_state`](crate::testing::set_process_state)) or the plugin kills it.

use std::cell::RefCell;
use std::collections::BTreeMap;

use crate::process::{CapturedOutput, IdRange, ProcessState, Signal, SpawnOptions, MAX_ID_RANGES};
use crate::CapabilityError;

/// One process of the fake, as [`processes`](crate::testing::processes) shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeProcess {
    /// The id `spawn` returned.
    pub id: String,
    /// The program started.
    pub program: String,
    /// Its arguments (after argv\[0\]).
    pub args: Vec<String>,
    /// The options it was started with.
    pub options: SpawnOptions,
    /// Its state now.
    pub state: ProcessState,
    /// Every signal sent to it, with `whole_tree`, in order.
    pub signals: Vec<(Signal, bool)>,
    /// What `output` returns.
    pub output: CapturedOutput,
    /// Whether the plugin released it (the capability then no longer knows it).
    pub released: bool,
}

#[derive(Default)]
struct Fake {
    /// `None`: every absolute program is granted.
    granted: Option<Vec<String>>,
    processes: BTreeMap<u64, FakeProcess>,
    next: u64,
    fail_next: Option<CapabilityError>,
    /// What a new process starts as (`None`: running, no output).
    spawn_as: Option<(ProcessState, CapturedOutput)>,
}

thread_local! {
    static FAKE: RefCell<Fake> = RefCell::new(Fake::default());
}

fn key(id: &str) -> Option<u64> {
    id.strip_prefix("fake-")?.parse().ok()
}

/// Runs `f` on the process `id` unless it is unknown or released.
fn with_process<T>(
    id: &str,
    f: impl FnOnce(&mut FakeProcess) -> Result<T, CapabilityError>,
) -> Result<T, CapabilityError> {
    FAKE.with(|fake| {
        let mut fake = fake.borrow_mut();
        if let Some(e) = fake.fail_next.take() {
            return Err(e);
        }
        match key(id).and_then(|k| fake.processes.get_mut(&k)) {
            Some(p) if !p.released => f(p),
            _ => Err(CapabilityError::NotFound(format!("process {id:?}"))),
        }
    })
}

/// The host's rule for a program: absolute, no `.`, `..` or empty segment.
fn normal_path(program: &str) -> bool {
    program.len() > 1
        && program.starts_with('/')
        && program[1..]
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..")
}

/// The host's rule for a mapping: 1 to 8 ranges, each of at least one id, host ids below 2^31.
fn check_ranges(ranges: &[IdRange]) -> Result<(), CapabilityError> {
    if ranges.is_empty() || ranges.len() > MAX_ID_RANGES {
        return Err(CapabilityError::Invalid(format!(
            "a user namespace needs 1 to {MAX_ID_RANGES} id ranges"
        )));
    }
    for r in ranges {
        let fits = r.count > 0
            && u64::from(r.outside) + u64::from(r.count) <= 1 << 31
            && u64::from(r.inside) + u64::from(r.count) <= u64::from(u32::MAX);
        if !fits {
            return Err(CapabilityError::Invalid(format!(
                "id range {r:?}: count must be positive and host ids below 2^31"
            )));
        }
    }
    Ok(())
}

pub fn spawn(
    program: &str,
    args: &[String],
    options: &SpawnOptions,
) -> Result<String, CapabilityError> {
    FAKE.with(|fake| {
        let mut fake = fake.borrow_mut();
        if let Some(e) = fake.fail_next.take() {
            return Err(e);
        }
        if !normal_path(program) {
            return Err(CapabilityError::Invalid(format!(
                "program {program:?}: must be an absolute path without ., .. or //"
            )));
        }
        if let Some(granted) = &fake.granted {
            if !granted.iter().any(|g| g == program) {
                return Err(CapabilityError::NotGranted(format!("process {program}")));
            }
        }
        if args.iter().any(|a| a.contains('\0')) {
            return Err(CapabilityError::Invalid(
                "an argument contains NUL".to_string(),
            ));
        }
        let bad_env = options
            .env
            .iter()
            .any(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'));
        if bad_env {
            return Err(CapabilityError::Invalid(
                "a variable is malformed".to_string(),
            ));
        }
        if let Some(ranges) = &options.user_namespace {
            check_ranges(ranges)?;
        }
        fake.next += 1;
        let id = format!("fake-{}", fake.next);
        let (state, output) = fake
            .spawn_as
            .clone()
            .unwrap_or((ProcessState::Running, CapturedOutput::default()));
        let process = FakeProcess {
            id: id.clone(),
            program: program.to_string(),
            args: args.to_vec(),
            options: options.clone(),
            state,
            signals: Vec::new(),
            output,
            released: false,
        };
        let next = fake.next;
        fake.processes.insert(next, process);
        Ok(id)
    })
}

pub fn state(id: &str) -> Result<ProcessState, CapabilityError> {
    with_process(id, |p| Ok(p.state))
}

/// Nothing runs, so nothing ends by itself: the state now is the state after any wait.
pub fn wait(id: &str, _timeout_ms: u32) -> Result<ProcessState, CapabilityError> {
    with_process(id, |p| Ok(p.state))
}

pub fn kill(id: &str, signal: Signal, whole_tree: bool) -> Result<(), CapabilityError> {
    with_process(id, |p| {
        p.signals.push((signal, whole_tree));
        if p.state.is_running() {
            p.state = ProcessState::Signaled(signal.number());
        }
        Ok(())
    })
}

pub fn output(id: &str) -> Result<CapturedOutput, CapabilityError> {
    with_process(id, |p| Ok(p.output.clone()))
}

pub fn release(id: &str) -> Result<(), CapabilityError> {
    with_process(id, |p| {
        if p.state.is_running() {
            p.signals.push((Signal::Kill, true));
            p.state = ProcessState::Signaled(Signal::Kill.number());
        }
        p.released = true;
        Ok(())
    })
}

pub fn list() -> Vec<String> {
    FAKE.with(|f| {
        f.borrow()
            .processes
            .values()
            .filter(|p| !p.released)
            .map(|p| p.id.clone())
            .collect()
    })
}

pub(crate) fn set_granted(programs: Option<Vec<String>>) {
    FAKE.with(|f| f.borrow_mut().granted = programs);
}

pub(crate) fn spawn_as(outcome: Option<(ProcessState, CapturedOutput)>) {
    FAKE.with(|f| f.borrow_mut().spawn_as = outcome);
}

pub(crate) fn fail_next(error: CapabilityError) {
    FAKE.with(|f| f.borrow_mut().fail_next = Some(error));
}

pub(crate) fn all() -> Vec<FakeProcess> {
    FAKE.with(|f| f.borrow().processes.values().cloned().collect())
}

/// Changes a process the test knows by id (released ones included); false if unknown.
pub(crate) fn update(id: &str, f: impl FnOnce(&mut FakeProcess)) -> bool {
    FAKE.with(|fake| {
        let mut fake = fake.borrow_mut();
        match key(id).and_then(|k| fake.processes.get_mut(&k)) {
            Some(p) => {
                f(p);
                true
            }
            None => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{process, testing};

    #[test]
    fn behaves_like_the_host() {
        let none = SpawnOptions::default();
        for bad in ["sh", "/usr/bin/../bin/sh", "/usr//bin/sh", "/"] {
            assert!(
                matches!(
                    process::spawn(bad, &["x"], &none),
                    Err(CapabilityError::Invalid(_))
                ),
                "{bad}"
            );
        }
        let mapped = |ranges: Vec<IdRange>| {
            process::spawn("/bin/x", &["x"], &none.clone().user_namespace(ranges))
        };
        assert!(mapped(vec![]).is_err());
        assert!(mapped(vec![IdRange {
            inside: 0,
            outside: 0,
            count: 0
        }])
        .is_err());
        assert!(mapped(vec![IdRange {
            inside: 0,
            outside: 1 << 31,
            count: 1
        }])
        .is_err());
        assert!(mapped(vec![IdRange {
            inside: 0,
            outside: 100_000,
            count: 65536
        }])
        .is_ok());

        testing::set_granted_programs(["/usr/bin/sleep"]);
        assert!(matches!(
            process::spawn("/bin/sh", &["x"], &none),
            Err(CapabilityError::NotGranted(_))
        ));
        let id = process::spawn("/usr/bin/sleep", &["9"], &none).unwrap();
        assert_eq!(process::list(), vec!["fake-1".to_string(), id.clone()]);
        assert!(matches!(
            process::state("1"),
            Err(CapabilityError::NotFound(_))
        ));
        process::kill(&id, Signal::Term, false).unwrap();
        assert_eq!(
            process::wait(&id, std::time::Duration::ZERO),
            Ok(ProcessState::Signaled(15))
        );
        process::release(&id).unwrap();
        assert!(matches!(
            process::state(&id),
            Err(CapabilityError::NotFound(_))
        ));
        assert_eq!(process::list(), vec!["fake-1".to_string()]);
        // A running process released is killed with its tree first.
        process::release("fake-1").unwrap();
        assert_eq!(testing::processes()[0].signals, vec![(Signal::Kill, true)]);
    }
}
