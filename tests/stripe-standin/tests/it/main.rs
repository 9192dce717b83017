//! Integration tests of the Stripe stand-in: one test per documented Stripe rule it
//! reproduces, driven over HTTP exactly as a sink would, plus the contract check against
//! Stripe's official stripe-mock.

mod contract;
mod helpers;
mod meter_events;
mod resources;
mod webhooks;
