//! Test fixture: `before-command` allocates and touches memory, 1 MiB at a time, until the
//! host's memory limit stops it (the allocation fails and the instance traps).

use opensandbox_plugin_sdk::{export_hook, Caller, Command, CommandDecision, Hook};

struct MemBomb;

impl Hook for MemBomb {
    fn before_command(_command: &Command, _caller: &Caller) -> CommandDecision {
        const CHUNK: usize = 1 << 20;
        let mut kept: Vec<Vec<u8>> = Vec::new();
        loop {
            let mut chunk = vec![0u8; CHUNK];
            for i in (0..CHUNK).step_by(4096) {
                chunk[i] = 1;
            }
            kept.push(std::hint::black_box(chunk));
        }
    }
}

export_hook!(MemBomb);
