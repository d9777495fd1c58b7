//! Signalling a process and all its descendants by host PID, read from /proc.
//! Used when a command times out (the engine has no call that kills an exec,
//! and killing only the shell would leave its children running) and by the
//! runtime plugins' process capability.

use std::collections::{HashMap, VecDeque};
use std::fs;

/// Sends SIGKILL to `root` and every descendant; returns how many were signalled.
pub fn kill_tree(root: i32) -> usize {
    signal_tree(root, libc::SIGKILL).len()
}

/// Sends `signal` to `root` and every descendant, parents first (so a
/// stopped parent cannot start new children after its own were signalled);
/// returns the pids that were signalled.
pub fn signal_tree(root: i32, signal: i32) -> Vec<i32> {
    tree(root)
        .into_iter()
        // SAFETY: kill(2) with a plain pid and signal has no memory effects.
        .filter(|pid| unsafe { libc::kill(*pid, signal) } == 0)
        .collect()
}

/// `root` and every descendant, parents first.
fn tree(root: i32) -> Vec<i32> {
    let children = children_by_parent();
    let mut members = Vec::new();
    let mut queue = VecDeque::from([root]);
    while let Some(pid) = queue.pop_front() {
        members.push(pid);
        if let Some(kids) = children.get(&pid) {
            queue.extend(kids.iter().copied());
        }
    }
    members
}

fn children_by_parent() -> HashMap<i32, Vec<i32>> {
    let mut map: HashMap<i32, Vec<i32>> = HashMap::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return map;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if let Some(ppid) = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| parent_of(&stat))
        {
            map.entry(ppid).or_default().push(pid);
        }
    }
    map
}

/// Parses the parent PID out of /proc/PID/stat; the command name may hold
/// spaces and parentheses, so fields are counted after the last `)`.
fn parent_of(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_parent_even_with_odd_names() {
        assert_eq!(parent_of("12 (sh) S 7 12 12 0"), Some(7));
        assert_eq!(parent_of("12 (a) b) (c) R 99 1"), Some(99));
        assert_eq!(parent_of("garbage"), None);
    }

    #[test]
    fn kills_a_shell_and_its_children() {
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 30 & sleep 30; wait"])
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let pid = i32::try_from(child.id()).unwrap();
        let before = children_by_parent().get(&pid).map_or(0, Vec::len);
        assert_eq!(before, 2, "the shell should have two sleeping children");
        assert_eq!(kill_tree(pid), 3);
        let status = child.wait().unwrap();
        assert!(!status.success());
    }
}
