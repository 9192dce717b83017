#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meterline_fuzz::usage_raw::check(data));
