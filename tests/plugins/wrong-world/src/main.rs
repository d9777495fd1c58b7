//! Test fixture: a WASI command component, which implements neither `policy-plugin` nor
//! `hook-plugin`; the host must refuse to load it as a plugin.

fn main() {
    println!("wrong-world: I am a command, not a plugin");
}
