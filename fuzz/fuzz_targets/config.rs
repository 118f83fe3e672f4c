//! Configuration loading on arbitrary text: a list of problems or a configuration, never a
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = matrix_oidc_gateway::config::load_str(text);
    }
});
