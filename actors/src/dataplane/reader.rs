//! The TUN reader actor: reads IP packets from the device in batches into
//! buffers from a fixed pool and hands each batch to the data plane in one
//! message (the pool is the back-pressure between TUN and the sessions).

use super::BATCH_POOL;
use super::BATCH_SLOTS;
use actix::prelude::*;
use std::io;
use std::sync::Arc;
use tokio::sync::mpsc;
use transport::PacketDevice;

/// A batch of packets read from TUN, packed in one buffer.
#[derive(Debug)]
pub struct Batch {
    pub(super) buf: Vec<u8>,
    pub(super) lens: Vec<u16>,
    pub(super) slot: usize,
}

impl Batch {
    pub(super) fn new(slot: usize) -> Batch {
        Batch {
            buf: vec![0; slot * BATCH_SLOTS],
            lens: Vec::with_capacity(BATCH_SLOTS),
            slot,
        }
    }

    /// The packets.
    pub fn packets(&self) -> impl Iterator<Item = &[u8]> {
        self.lens
            .iter()
            .enumerate()
            .map(|(i, n)| &self.buf[i * self.slot..i * self.slot + *n as usize])
    }
}

/// A batch of TUN packets for the data plane.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct TunBatch(pub Batch);

/// Reads IP packets from the TUN device in batches and hands them to the data plane.
pub struct TunReader<P: PacketDevice + 'static> {
    dev: Arc<P>,
    to: Recipient<TunBatch>,
    free: Option<mpsc::Receiver<Batch>>,
    scratch: Vec<u8>,
    /// Packets truncated or unreadable.
    pub errors: u64,
}

impl<P: PacketDevice + 'static> TunReader<P> {
    /// A reader of `dev` with a pool of batches sized for packets up to
    /// `max_packet` bytes. Returns the reader and the channel batches go back
    /// through (give it to [`Dataplane::new`]).
    pub fn new(
        dev: Arc<P>,
        to: Recipient<TunBatch>,
        max_packet: usize,
    ) -> (TunReader<P>, mpsc::Sender<Batch>) {
        let (tx, rx) = mpsc::channel(BATCH_POOL);
        let slot = max_packet.clamp(576, 65_535);
        for _ in 0..BATCH_POOL {
            let _ = tx.try_send(Batch::new(slot));
        }
        (
            TunReader {
                dev,
                to,
                free: Some(rx),
                scratch: Vec::new(),
                errors: 0,
            },
            tx,
        )
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Fillable(Batch);

impl<P: PacketDevice + 'static> Actor for TunReader<P> {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        let Some(free) = self.free.take() else {
            return;
        };
        // A batch is read only when a free buffer exists: the pool is the
        // back-pressure between TUN and the sessions.
        let s =
            futures_util::stream::unfold((free, self.dev.clone()), |(mut free, dev)| async move {
                let b = free.recv().await?;
                dev.readable().await.ok()?;
                Some((Fillable(b), (free, dev)))
            });
        ctx.add_stream(s);
    }
}

impl<P: PacketDevice + 'static> StreamHandler<Fillable> for TunReader<P> {
    fn handle(&mut self, f: Fillable, ctx: &mut Context<Self>) {
        let mut b = f.0;
        match fill(&*self.dev, &mut self.scratch, &mut b, false) {
            Filled::Closed => ctx.stop(),
            Filled::Failed => self.errors += 1,
            Filled::Done => {}
        }
        // Even an empty batch goes through, so the buffer returns to the pool.
        self.to.do_send(TunBatch(b));
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

/// How a [`fill`] ended.
pub(super) enum Filled {
    /// The device had no more packets, or the batch is full.
    Done,
    /// The device is gone.
    Closed,
    /// A read failed (the packets before it are in the batch).
    Failed,
}

/// Read what the device has, without waiting, into `b` (emptied first),
/// until it has no more or `b` has no room for another read. `now`: read
/// even if the runtime has not seen the device readable
/// ([`PacketDevice::recv_many_now`]).
pub(super) fn fill<P: PacketDevice>(
    dev: &P,
    scratch: &mut Vec<u8>,
    b: &mut Batch,
    now: bool,
) -> Filled {
    b.lens.clear();
    let need = dev.min_slots().clamp(1, BATCH_SLOTS);
    let mut lens = [0usize; BATCH_SLOTS];
    // Every slot of the batch, listed once per fill (not per read: a ping's
    // fill is one read and one that finds the device empty), without
    // allocating the list.
    let mut chunks = b.buf.chunks_mut(b.slot);
    let mut slots: [&mut [u8]; BATCH_SLOTS] =
        std::array::from_fn(|_| chunks.next().unwrap_or_default());
    let mut used = 0;
    while BATCH_SLOTS - used >= need {
        let (slots, lens) = (&mut slots[used..], &mut lens[used..]);
        let read = if now {
            dev.recv_many_now(scratch, slots, lens)
        } else {
            dev.try_recv_many(scratch, slots, lens)
        };
        match read {
            Ok(0) => break,
            Ok(n) => {
                b.lens.extend(lens[..n].iter().map(|&l| l as u16));
                used += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Filled::Closed,
            Err(_) => return Filled::Failed,
        }
    }
    Filled::Done
}
