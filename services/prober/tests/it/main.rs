//! The prober against an in-process stack (`colloquy_testkit::TestApp`): it succeeds through
//! a healthy stack, counts each kind of failure, and exports what it saw on `/metrics`.

mod application;
mod probe;
mod slo_drill;
