#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meterline_fuzz::stripe_signature::check(data));
