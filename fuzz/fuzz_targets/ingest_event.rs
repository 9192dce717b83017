#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meterline_fuzz::ingest_event::check(data));
