#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meterline_fuzz::standin_form::check(data));
