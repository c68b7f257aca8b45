//! The FreeBSD driver's command plan.
