//! Test fixture: `before-command` panics, which traps the instance (`panic = abort` on wasm).

use opensandbox_plugin_sdk::{export_hook, Caller, Command, CommandDecision, Hook};

struct TrapHook;

impl Hook for TrapHook {
    fn before_command(command: &Command, _caller: &Caller) -> CommandDecision {
        panic!("trap-hook: deliberate panic before {:?}", command.command)
    }
}

export_hook!(TrapHook);
