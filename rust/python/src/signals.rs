//! Python signals (Ctrl-C) during blocking core calls.

use std::cell::RefCell;
use std::rc::Rc;

use feedline_core::runtime;
use pyo3::prelude::*;

/// Runs `work` without the GIL. While it blocks, Python's signal handlers
/// run every few milliseconds; when one raises (`KeyboardInterrupt` on
/// Ctrl-C), the core drops the reads in flight, `work`'s output is
/// discarded and that exception is returned.
pub fn detach_interruptible<T, F>(py: Python<'_>, work: F) -> PyResult<T>
where
    F: Send + FnOnce() -> T,
    T: Send,
{
    let (out, raised) = py.detach(|| {
        let raised: Rc<RefCell<Option<PyErr>>> = Rc::default();
        let slot = Rc::clone(&raised);
        let check = Rc::new(move || {
            Python::attach(|py| match py.check_signals() {
                Ok(()) => false,
                Err(e) => {
                    *slot.borrow_mut() = Some(e);
                    true
                }
            })
        });
        let out = runtime::with_interrupt(check, work);
        let raised = raised.borrow_mut().take();
        (out, raised)
    });
    match raised {
        Some(e) => Err(e),
        None => Ok(out),
    }
}
