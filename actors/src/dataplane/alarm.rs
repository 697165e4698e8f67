//! The data plane's one timer: a deadline the actor moves after every poll
//! sequence, and a stream that fires when it passes.

use actix::prelude::*;
use futures_util::Stream;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context as TaskCx, Poll, Waker};
use tokio::time::{Instant, Sleep};

/// A deadline the actor moves; its stream fires when the deadline passes.
#[derive(Default)]
pub(super) struct AlarmShared {
    deadline: Cell<Option<Instant>>,
    waker: RefCell<Option<Waker>>,
}

pub(super) struct AlarmStream {
    pub(super) shared: Rc<AlarmShared>,
    pub(super) sleep: Pin<Box<Sleep>>,
    pub(super) armed: Option<Instant>,
}

#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct AlarmFired;

impl Stream for AlarmStream {
    type Item = AlarmFired;
    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<Option<AlarmFired>> {
        let this = self.get_mut();
        {
            let mut w = this.shared.waker.borrow_mut();
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
            }
        }
        let d = this.shared.deadline.get();
        if d != this.armed {
            if let Some(d) = d {
                this.sleep.as_mut().reset(d);
            }
            this.armed = d;
        }
        if this.armed.is_none() {
            return Poll::Pending;
        }
        match this.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                this.armed = None;
                this.shared.deadline.set(None);
                Poll::Ready(Some(AlarmFired))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

pub(super) fn alarm_set(a: &AlarmShared, d: Option<Instant>) {
    if a.deadline.get() != d {
        a.deadline.set(d);
        if let Some(w) = a.waker.borrow_mut().take() {
            w.wake();
        }
    }
}
