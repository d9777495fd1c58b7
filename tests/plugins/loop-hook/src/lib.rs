//! Test fixture: `before-command` loops forever (the host must trap it on its time limit).

use opensandbox_plugin_sdk::{export_hook, Caller, Command, CommandDecision, Hook};

struct LoopHook;

impl Hook for LoopHook {
    fn before_command(_command: &Command, _caller: &Caller) -> CommandDecision {
        let mut n: u64 = 0;
        loop {
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }
}

export_hook!(LoopHook);
