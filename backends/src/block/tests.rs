//! Engine tests: a real `GuestMemoryMmap`, `MockSplitQueue` as the driver, a temp image.

use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::QueueError;

type Mem = GuestMemoryMmap<()>;

const QSIZE: u16 = 16;
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const MEM_SIZE: usize = 0x10_0000;
const IMG_SECTORS: u64 = 64;

fn mem() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn image() -> TempFile {
    let f = TempFile::new().unwrap();
    let data: Vec<u8> = (0..IMG_SECTORS * 512)
        .map(|i| (i / 512) as u8 ^ 0x5a)
        .collect();
    std::fs::write(f.as_path(), data).unwrap();
    f
}

/// Drops the image from the page cache, so that reads must wait for the disk.
fn evict(f: &TempFile) {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(f.as_path()).unwrap();
    file.sync_all().unwrap();
    // SAFETY: an advisory call on a file descriptor we own.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0);
    // Check with mincore, which (unlike a RWF_NOWAIT read) starts no readahead.
    let len = std::fs::metadata(f.as_path()).unwrap().len() as usize;
    // SAFETY: a new private read-only mapping of a file we own; only passed to mincore and
    // munmap, never dereferenced.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let mut vec = vec![0u8; len.div_ceil(4096)];
    // SAFETY: `p` maps `len` bytes; `vec` has one byte per page.
    let r = unsafe { libc::mincore(p, len, vec.as_mut_ptr()) };
    // SAFETY: unmapping the mapping made above.
    unsafe { libc::munmap(p, len) };
    assert_eq!(r, 0);
    assert!(
        vec.iter().all(|&v| v & 1 == 0),
        "the image is still cached after POSIX_FADV_DONTNEED"
    );
}

fn disk(f: &TempFile, engine: EngineChoice, readonly: bool, direct: bool) -> Arc<BlockBackend> {
    Arc::new(
        BlockBackend::open(&BlockOptions {
            path: f.as_path().into(),
            readonly,
            direct,
            engine,
            serial: Some("serial-1234".into()),
        })
        .unwrap(),
    )
}

fn d(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

fn hdr(m: &Mem, type_: u32, sector: u64) {
    m.write_obj(type_.to_le(), GuestAddress(HDR)).unwrap();
    m.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    m.write_obj(sector.to_le(), GuestAddress(HDR + 8)).unwrap();
}

/// A standard 3-descriptor request: header, data (writable for IN), status.
fn three(data_len: u32, data_writable: bool) -> Vec<RawDescriptor> {
    let wf = if data_writable { VRING_DESC_F_WRITE } else { 0 };
    vec![
        d(HDR, 16, VRING_DESC_F_NEXT, 1),
        d(DATA, data_len, VRING_DESC_F_NEXT | wf, 2),
        d(STATUS, 1, VRING_DESC_F_WRITE, 0),
    ]
}

struct Run {
    status: u8,
    used_len: u32,
    used_idx: u16,
    outcome: crate::QueueOutcome,
}

/// Puts `descs` in a fresh queue, runs the engine to completion, returns the result.
fn run_with(
    m: &Mem,
    disk: Arc<BlockBackend>,
    descs: &[RawDescriptor],
    setup: impl FnOnce(&MockSplitQueue<Mem>, &mut Queue),
) -> Run {
    m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let vq = MockSplitQueue::new(m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.add_desc_chains(descs, 0).unwrap();
    setup(&vq, &mut q);
    let mut bq = BlockQueue::new(disk, m, QSIZE).unwrap();
    let mut outcome = bq.process_queue(&mut q).unwrap();
    outcome.merge(bq.drain(&mut q).unwrap());
    let used_idx = u16::from_le(vq.used().idx().load());
    let elem = vq.used().ring().ref_at(0).unwrap().load();
    Run {
        status: m.read_obj(GuestAddress(STATUS)).unwrap(),
        used_len: elem.len(),
        used_idx,
        outcome,
    }
}

fn run(m: &Mem, disk: Arc<BlockBackend>, descs: &[RawDescriptor]) -> Run {
    run_with(m, disk, descs, |_, _| {})
}

const ENGINES: [EngineChoice; 2] = [EngineChoice::Sync, EngineChoice::IoUring];

fn sector_byte(s: u64) -> u8 {
    s as u8 ^ 0x5a
}

#[test]
fn io_uring_is_available_here() {
    probe_io_uring().unwrap();
    let f = image();
    assert_eq!(
        disk(&f, EngineChoice::Auto, false, false).engine(),
        EngineKind::IoUring
    );
    assert_eq!(
        disk(&f, EngineChoice::Sync, false, false).engine(),
        EngineKind::Sync
    );
}

#[test]
fn read_both_engines() {
    for engine in ENGINES {
        let m = mem();
        let f = image();
        hdr(&m, VIRTIO_BLK_T_IN, 3);
        let r = run(&m, disk(&f, engine, false, false), &three(1024, true));
        assert_eq!(r.status, VIRTIO_BLK_S_OK as u8, "{engine:?}");
        assert_eq!(r.used_len, 1025);
        assert_eq!(r.used_idx, 1);
        assert!(r.outcome.notify);
        let mut buf = vec![0u8; 1024];
        m.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        assert!(buf[..512].iter().all(|&b| b == sector_byte(3)));
        assert!(buf[512..].iter().all(|&b| b == sector_byte(4)));
    }
}

#[test]
fn write_both_engines_lands_in_image() {
    for engine in ENGINES {
        let m = mem();
        let f = image();
        hdr(&m, VIRTIO_BLK_T_OUT, 10);
        m.write_slice(&[0xc3u8; 1536], GuestAddress(DATA)).unwrap();
        let r = run(&m, disk(&f, engine, false, false), &three(1536, false));
        assert_eq!(r.status, VIRTIO_BLK_S_OK as u8, "{engine:?}");
        assert_eq!(r.used_len, 1);
        let img = std::fs::read(f.as_path()).unwrap();
        assert!(img[10 * 512..13 * 512].iter().all(|&b| b == 0xc3));
        assert!(img[9 * 512..10 * 512].iter().all(|&b| b == sector_byte(9)));
        assert!(img[13 * 512..14 * 512]
            .iter()
            .all(|&b| b == sector_byte(13)));
    }
}

#[test]
fn scattered_buffers_and_split_header() {
    // Header split over two descriptors, data over three, status alone.
    for engine in ENGINES {
        let m = mem();
        let f = image();
        hdr(&m, VIRTIO_BLK_T_IN, 0);
        let w = VRING_DESC_F_WRITE | VRING_DESC_F_NEXT;
        let descs = vec![
            d(HDR, 5, VRING_DESC_F_NEXT, 1),
            d(HDR + 5, 11, VRING_DESC_F_NEXT, 2),
            d(DATA, 100, w, 3),
            d(DATA + 0x1000, 900, w, 4),
            d(DATA + 0x2000, 24, w, 5),
            d(STATUS, 1, VRING_DESC_F_WRITE, 0),
        ];
        let r = run(&m, disk(&f, engine, false, false), &descs);
        assert_eq!(r.status, 0, "{engine:?}");
        assert_eq!(r.used_len, 1025);
        let b: u8 = m.read_obj(GuestAddress(DATA + 0x1000 + 411)).unwrap();
        assert_eq!(b, sector_byte(0));
        let b: u8 = m.read_obj(GuestAddress(DATA + 0x1000 + 412)).unwrap();
        assert_eq!(b, sector_byte(1));
    }
}

#[test]
fn flush_both_engines() {
    for engine in ENGINES {
        let m = mem();
        let f = image();
        hdr(&m, VIRTIO_BLK_T_FLUSH, 0);
        let descs = vec![
            d(HDR, 16, VRING_DESC_F_NEXT, 1),
            d(STATUS, 1, VRING_DESC_F_WRITE, 0),
        ];
        let dk = disk(&f, engine, false, false);
        let r = run(&m, dk, &descs);
        assert_eq!(r.status, VIRTIO_BLK_S_OK as u8, "{engine:?}");
        assert_eq!(r.used_len, 1);
    }
}

#[test]
fn get_id() {
    let m = mem();
    let f = image();
    hdr(&m, VIRTIO_BLK_T_GET_ID, 0);
    let r = run(
        &m,
        disk(&f, EngineChoice::Sync, false, false),
        &three(20, true),
    );
    assert_eq!(r.status, 0);
    assert_eq!(r.used_len, 21);
    let mut id = [0u8; 20];
    m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..11], b"serial-1234");
    assert!(id[11..].iter().all(|&b| b == 0));
}

fn dwz(m: &Mem, type_: u32, sector: u64, n: u32, flags: u32) -> Vec<RawDescriptor> {
    hdr(m, type_, 0);
    m.write_obj(sector.to_le(), GuestAddress(DATA)).unwrap();
    m.write_obj(n.to_le(), GuestAddress(DATA + 8)).unwrap();
    m.write_obj(flags.to_le(), GuestAddress(DATA + 12)).unwrap();
    three(16, false)
}

#[test]
fn discard_both_engines() {
    for engine in ENGINES {
        let m = mem();
        let f = image();
        let descs = dwz(&m, VIRTIO_BLK_T_DISCARD, 8, 16, 0);
        let r = run(&m, disk(&f, engine, false, false), &descs);
        assert_eq!(r.status, 0, "{engine:?}");
        let img = std::fs::read(f.as_path()).unwrap();
        assert_eq!(img.len() as u64, IMG_SECTORS * 512, "KEEP_SIZE");
        // ext4 punches 4 KiB blocks: sectors 8..24 are block aligned.
        assert!(img[8 * 512..24 * 512].iter().all(|&b| b == 0));
        assert!(img[24 * 512..25 * 512]
            .iter()
            .all(|&b| b == sector_byte(24)));
    }
}

#[test]
fn discard_with_unmap_flag_is_unsupported() {
    let m = mem();
    let f = image();
    let descs = dwz(
        &m,
        VIRTIO_BLK_T_DISCARD,
        8,
        8,
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    );
    let r = run(&m, disk(&f, EngineChoice::Sync, false, false), &descs);
    assert_eq!(r.status, VIRTIO_BLK_S_UNSUPP as u8);
}

#[test]
fn write_zeroes_both_engines_with_and_without_unmap() {
    for engine in ENGINES {
        for flags in [0, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP] {
            let m = mem();
            let f = image();
            let descs = dwz(&m, VIRTIO_BLK_T_WRITE_ZEROES, 3, 5, flags);
            let r = run(&m, disk(&f, engine, false, false), &descs);
            assert_eq!(r.status, 0, "{engine:?} {flags}");
            let img = std::fs::read(f.as_path()).unwrap();
            assert_eq!(img.len() as u64, IMG_SECTORS * 512);
            assert!(img[2 * 512..3 * 512].iter().all(|&b| b == sector_byte(2)));
            assert!(img[3 * 512..8 * 512].iter().all(|&b| b == 0));
            assert!(img[8 * 512..9 * 512].iter().all(|&b| b == sector_byte(8)));
        }
    }
}

#[test]
fn discard_past_end_is_ioerr() {
    let m = mem();
    let f = image();
    let descs = dwz(&m, VIRTIO_BLK_T_WRITE_ZEROES, IMG_SECTORS - 1, 2, 0);
    let r = run(&m, disk(&f, EngineChoice::Sync, false, false), &descs);
    assert_eq!(r.status, VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn unknown_type_is_unsupp() {
    let m = mem();
    let f = image();
    hdr(&m, 0x1234, 0);
    let r = run(
        &m,
        disk(&f, EngineChoice::Sync, false, false),
        &three(512, true),
    );
    assert_eq!(r.status, VIRTIO_BLK_S_UNSUPP as u8);
    assert_eq!(r.used_len, 1);
}

#[test]
fn readonly_disk_refuses_writes() {
    for engine in ENGINES {
        let m = mem();
        let f = image();
        let dk = disk(&f, engine, true, false);
        hdr(&m, VIRTIO_BLK_T_OUT, 0);
        m.write_slice(&[0u8; 512], GuestAddress(DATA)).unwrap();
        let r = run(&m, dk.clone(), &three(512, false));
        assert_eq!(r.status, VIRTIO_BLK_S_IOERR as u8);
        let descs = dwz(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0, 1, 0);
        assert_eq!(run(&m, dk.clone(), &descs).status, VIRTIO_BLK_S_IOERR as u8);
        let img = std::fs::read(f.as_path()).unwrap();
        assert!(img[..512].iter().all(|&b| b == sector_byte(0)));
        // Reads still work.
        hdr(&m, VIRTIO_BLK_T_IN, 0);
        assert_eq!(run(&m, dk, &three(512, true)).status, 0);
    }
}

#[test]
fn sectors_past_the_end() {
    let m = mem();
    let f = image();
    let dk = disk(&f, EngineChoice::Sync, false, false);
    hdr(&m, VIRTIO_BLK_T_IN, IMG_SECTORS - 1);
    assert_eq!(
        run(&m, dk.clone(), &three(1024, true)).status,
        VIRTIO_BLK_S_IOERR as u8
    );
    hdr(&m, VIRTIO_BLK_T_IN, u64::MAX);
    assert_eq!(
        run(&m, dk.clone(), &three(512, true)).status,
        VIRTIO_BLK_S_IOERR as u8
    );
    // The last sector is fine.
    hdr(&m, VIRTIO_BLK_T_IN, IMG_SECTORS - 1);
    assert_eq!(run(&m, dk, &three(512, true)).status, 0);
}

#[test]
fn data_not_a_multiple_of_512() {
    let m = mem();
    let f = image();
    hdr(&m, VIRTIO_BLK_T_IN, 0);
    let r = run(
        &m,
        disk(&f, EngineChoice::Sync, false, false),
        &three(100, true),
    );
    assert_eq!(r.status, VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn header_too_short() {
    let m = mem();
    let f = image();
    hdr(&m, VIRTIO_BLK_T_IN, 0);
    let descs = vec![
        d(HDR, 8, VRING_DESC_F_NEXT, 1),
        d(STATUS, 1, VRING_DESC_F_WRITE, 0),
    ];
    let r = run(&m, disk(&f, EngineChoice::Sync, false, false), &descs);
    assert_eq!(r.status, VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(r.used_len, 1);
}

#[test]
fn status_descriptor_device_readable() {
    let m = mem();
    let f = image();
    hdr(&m, VIRTIO_BLK_T_OUT, 0);
    let descs = vec![
        d(HDR, 16, VRING_DESC_F_NEXT, 1),
        d(DATA, 512, VRING_DESC_F_NEXT, 2),
        d(STATUS, 1, 0, 0),
    ];
    let r = run(&m, disk(&f, EngineChoice::Sync, false, false), &descs);
    // Nowhere to write a status: returned with len 0, guest memory untouched.
    assert_eq!(r.status, 0xff);
    assert_eq!(r.used_len, 0);
    assert_eq!(r.used_idx, 1);
}

#[test]
fn read_with_device_readable_data_buffer() {
    let m = mem();
    let f = image();
    hdr(&m, VIRTIO_BLK_T_IN, 0);
    m.write_slice(&[0x11u8; 512], GuestAddress(DATA)).unwrap();
    let r = run(
        &m,
        disk(&f, EngineChoice::Sync, false, false),
        &three(512, false),
    );
    assert_eq!(r.status, VIRTIO_BLK_S_IOERR as u8);
    let b: u8 = m.read_obj(GuestAddress(DATA)).unwrap();
    assert_eq!(
        b, 0x11,
        "the device must not write a device-readable buffer"
    );
}

#[test]
fn readable_after_writable_descriptor() {
    let m = mem();
    let f = image();
    hdr(&m, VIRTIO_BLK_T_IN, 0);
    let descs = vec![
        d(HDR, 16, VRING_DESC_F_NEXT, 1),
        d(DATA, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2),
        d(DATA + 0x1000, 512, VRING_DESC_F_NEXT, 3),
        d(STATUS, 1, VRING_DESC_F_WRITE, 0),
    ];
    let dk = disk(&f, EngineChoice::Sync, false, false);
    let m2 = &m;
    let vq = MockSplitQueue::new(m2, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.add_desc_chains(&descs, 0).unwrap();
    let mut bq = BlockQueue::new(dk, m2, QSIZE).unwrap();
    bq.process_queue(&mut q).unwrap();
    assert_eq!(bq.faults(BlkFault::Chain), 1);
    assert_eq!(bq.stats().errors, 1);
}

#[test]
fn descriptor_loop() {
    let m = mem();
    let f = image();
    hdr(&m, VIRTIO_BLK_T_IN, 0);
    // 0 -> 1 -> 2 -> 1 -> 2 ... never ends.
    let descs = vec![
        d(HDR, 16, VRING_DESC_F_NEXT, 1),
        d(DATA, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2),
        d(STATUS, 1, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 1),
    ];
    let r = run(&m, disk(&f, EngineChoice::Sync, false, false), &descs);
    assert_eq!(r.used_idx, 1, "the chain is returned");
    // IOERR went to the last writable byte seen before the walk was cut (best effort).
    assert_eq!(r.used_len, 1);
}

#[test]
fn next_index_outside_the_table() {
    let m = mem();
    let f = image();
    hdr(&m, VIRTIO_BLK_T_IN, 0);
    let descs = vec![
        d(HDR, 16, VRING_DESC_F_NEXT, 1),
        d(STATUS, 1, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 999),
    ];
    let r = run(&m, disk(&f, EngineChoice::Sync, false, false), &descs);
    assert_eq!(r.used_idx, 1);
    assert_eq!(r.status, VIRTIO_BLK_S_IOERR as u8);
}

/// Writes an indirect table at `table` and returns the head descriptor pointing to it.
fn indirect(m: &Mem, table: u64, descs: &[RawDescriptor]) -> RawDescriptor {
    for (i, desc) in descs.iter().enumerate() {
        m.write_obj(*desc, GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    d(table, 16 * descs.len() as u32, VRING_DESC_F_INDIRECT, 0)
}

#[test]
fn indirect_descriptors_read() {
    for engine in ENGINES {
        let m = mem();
        let f = image();
        hdr(&m, VIRTIO_BLK_T_IN, 5);
        let head = indirect(&m, 0x4_0000, &three(512, true));
        let r = run(&m, disk(&f, engine, false, false), &[head]);
        assert_eq!(r.status, 0, "{engine:?}");
        assert_eq!(r.used_len, 513);
        let b: u8 = m.read_obj(GuestAddress(DATA + 511)).unwrap();
        assert_eq!(b, sector_byte(5));
    }
}

#[test]
fn chain_longer_than_the_queue() {
    let m = mem();
    let f = image();
    hdr(&m, VIRTIO_BLK_T_IN, 0);
    // An indirect table of 2 * QSIZE descriptors: legal for virtio-queue's walker, longer
    // than the queue size for us.
    let n = 2 * QSIZE as usize;
    let mut descs = vec![d(HDR, 16, VRING_DESC_F_NEXT, 1)];
    for i in 1..n - 1 {
        descs.push(d(
            DATA + 512 * i as u64,
            512,
            VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
            i as u16 + 1,
        ));
    }
    descs.push(d(STATUS, 1, VRING_DESC_F_WRITE, 0));
    let head = indirect(&m, 0x4_0000, &descs);
    let dk = disk(&f, EngineChoice::Sync, false, false);
    let vq = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.add_desc_chains(&[head], 0).unwrap();
    let mut bq = BlockQueue::new(dk, &m, QSIZE).unwrap();
    let out = bq.process_queue(&mut q).unwrap();
    assert_eq!(out.used, 1);
    assert_eq!(bq.faults(BlkFault::Chain), 1);
    assert_eq!(bq.stats().reads, 0);
}

#[test]
fn buffer_outside_guest_memory() {
    let m = mem();
    let f = image();
    hdr(&m, VIRTIO_BLK_T_IN, 0);
    let descs = vec![
        d(HDR, 16, VRING_DESC_F_NEXT, 1),
        d(
            MEM_SIZE as u64 - 256,
            512,
            VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
            2,
        ),
        d(STATUS, 1, VRING_DESC_F_WRITE, 0),
    ];
    let r = run(&m, disk(&f, EngineChoice::Sync, false, false), &descs);
    assert_eq!(r.used_idx, 1);
    assert_eq!(
        r.used_len, 0,
        "the chain was refused before its status was known"
    );
    // An address that overflows u64.
    let descs = vec![
        d(HDR, 16, VRING_DESC_F_NEXT, 1),
        d(
            u64::MAX - 10,
            512,
            VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
            2,
        ),
        d(STATUS, 1, VRING_DESC_F_WRITE, 0),
    ];
    let r = run(&m, disk(&f, EngineChoice::Sync, false, false), &descs);
    assert_eq!(r.used_idx, 1);
}

#[test]
fn queue_size_validation_and_broken_queues() {
    // virtio-queue refuses sizes that are not powers of two at creation...
    assert!(Queue::new(1000).is_err());
    assert!(Queue::new(0).is_err());
    let mut q = Queue::new(256).unwrap();
    // ...and when the driver writes one (set_size logs and keeps the old size).
    q.set_size(100);
    assert_eq!(q.size(), 256);
    assert!(q.try_set_size(100).is_err());
    assert!(q.try_set_size(512).is_err(), "larger than max_size");

    let f = image();
    let dk = disk(&f, EngineChoice::Sync, false, false);
    let m = mem();
    for bad in [0u16, 1000, 65535] {
        assert!(matches!(
            BlockQueue::new(dk.clone(), &m, bad),
            Err(BlockError::QueueSize(_))
        ));
    }

    // A queue that is not ready: an error, not a panic.
    let mut bq = BlockQueue::new(dk.clone(), &m, QSIZE).unwrap();
    let mut q = Queue::new(QSIZE).unwrap();
    assert!(matches!(
        bq.process_queue(&mut q),
        Err(QueueError::NotReady)
    ));

    // Rings outside guest memory.
    let vq = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    q.set_used_ring_address(Some(MEM_SIZE as u32 - 0x40), Some(0));
    assert!(matches!(
        bq.process_queue(&mut q),
        Err(QueueError::InvalidLayout { .. })
    ));

    // The driver moves avail.idx by more than the queue size.
    let vq = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.avail().idx().store(u16::to_le(QSIZE + 5));
    assert!(matches!(bq.process_queue(&mut q), Err(QueueError::Ring(_))));
}

#[test]
fn event_idx_suppresses_notifications() {
    let m = mem();
    let f = image();
    hdr(&m, VIRTIO_BLK_T_FLUSH, 0);
    let descs = vec![
        d(HDR, 16, VRING_DESC_F_NEXT, 1),
        d(STATUS, 1, VRING_DESC_F_WRITE, 0),
    ];
    let used_event_addr = |vq: &MockSplitQueue<Mem>| vq.avail_addr().0 + 4 + 2 * u64::from(QSIZE);
    // The driver asks for an interrupt only after used index 5: no notification.
    let r = run_with(
        &m,
        disk(&f, EngineChoice::Sync, false, false),
        &descs,
        |vq, q| {
            q.set_event_idx(true);
            m.write_obj(5u16.to_le(), GuestAddress(used_event_addr(vq)))
                .unwrap();
        },
    );
    assert_eq!(r.status, 0);
    assert_eq!(r.outcome.used, 1);
    assert!(!r.outcome.notify);
    // used_event = 0: the first used entry must be signalled.
    let r = run_with(
        &m,
        disk(&f, EngineChoice::Sync, false, false),
        &descs,
        |vq, q| {
            q.set_event_idx(true);
            m.write_obj(0u16, GuestAddress(used_event_addr(vq)))
                .unwrap();
        },
    );
    assert!(r.outcome.notify);
    // With EVENT_IDX the engine also published avail_event (= next_avail) for the driver.
    let vq = MockSplitQueue::new(&m, QSIZE);
    let avail_event: u16 = m
        .read_obj(GuestAddress(vq.used_addr().0 + 4 + 8 * u64::from(QSIZE)))
        .unwrap();
    assert_eq!(u16::from_le(avail_event), 1);
}

#[test]
fn io_uring_completions_through_the_eventfd() {
    let m = mem();
    let f = image();
    hdr(&m, VIRTIO_BLK_T_IN, 2);
    let vq = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.add_desc_chains(&three(512, true), 0).unwrap();
    let mut bq = BlockQueue::new(disk(&f, EngineChoice::IoUring, false, false), &m, QSIZE).unwrap();
    // Not in the page cache: the read is submitted, not served inline.
    evict(&f);
    let fd = bq.completion_fd().unwrap();
    let out = bq.process_queue(&mut q).unwrap();
    assert_eq!(out.used, 0, "submitted, not completed");
    assert_eq!(bq.in_flight(), 1);
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
    assert_eq!(n, 1);
    let mut used = 0;
    for _ in 0..100 {
        let out = bq.process_completions(&mut q).unwrap();
        used += out.used;
        if used == 1 {
            assert!(out.notify);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(used, 1);
    assert_eq!(bq.in_flight(), 0);
    let b: u8 = m.read_obj(GuestAddress(DATA)).unwrap();
    assert_eq!(b, sector_byte(2));
    assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
}

#[test]
fn cached_reads_complete_inline_and_uncached_ones_through_io_uring() {
    let m = mem();
    let f = image();
    // Two segments, so the inline read is a real preadv2 with several iovecs.
    let descs = [
        d(HDR, 16, VRING_DESC_F_NEXT, 1),
        d(DATA, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2),
        d(
            DATA + 0x8000,
            512,
            VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
            3,
        ),
        d(STATUS, 1, VRING_DESC_F_WRITE, 0),
    ];
    for cached in [true, false] {
        m.write_slice(&[0u8; 512], GuestAddress(DATA)).unwrap();
        m.write_slice(&[0u8; 512], GuestAddress(DATA + 0x8000))
            .unwrap();
        m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        hdr(&m, VIRTIO_BLK_T_IN, 5);
        let vq = MockSplitQueue::new(&m, QSIZE);
        let mut q: Queue = vq.create_queue().unwrap();
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut bq =
            BlockQueue::new(disk(&f, EngineChoice::IoUring, false, false), &m, QSIZE).unwrap();
        if cached {
            // Bring sectors 5-6 into the page cache.
            let mut buf = vec![0u8; 1024];
            std::os::unix::fs::FileExt::read_exact_at(
                &std::fs::File::open(f.as_path()).unwrap(),
                &mut buf,
                5 * 512,
            )
            .unwrap();
        } else {
            evict(&f);
        }
        let out = bq.process_queue(&mut q).unwrap();
        if cached {
            assert_eq!(out.used, 1, "a cached read completes in process_queue");
            assert!(out.notify);
            assert_eq!(bq.in_flight(), 0);
            assert_eq!(bq.stats().cached_reads, 1);
        } else {
            assert_eq!(out.used, 0, "an uncached read is submitted");
            assert_eq!(bq.in_flight(), 1);
            let out = bq.drain(&mut q).unwrap();
            assert_eq!(out.used, 1);
            assert_eq!(bq.stats().cached_reads, 0);
        }
        let used = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!(used.len(), 1025);
        assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
        let mut a = [0u8; 512];
        let mut b = [0u8; 512];
        m.read_slice(&mut a, GuestAddress(DATA)).unwrap();
        m.read_slice(&mut b, GuestAddress(DATA + 0x8000)).unwrap();
        assert!(a.iter().all(|&x| x == sector_byte(5)), "cached={cached}");
        assert!(b.iter().all(|&x| x == sector_byte(6)), "cached={cached}");
        let st = bq.stats();
        assert_eq!((st.reads, st.bytes_read, st.errors), (1, 1024, 0));
    }
}

#[test]
fn many_requests_io_uring() {
    // A full queue of reads, in flight together.
    let m = mem();
    let f = image();
    let vq = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    let n = QSIZE / 4;
    let mut descs = Vec::new();
    for i in 0..n {
        let base = 4 * i;
        let h = HDR + 0x100 * u64::from(i);
        m.write_obj(VIRTIO_BLK_T_IN.to_le(), GuestAddress(h))
            .unwrap();
        m.write_obj(u64::from(i).to_le(), GuestAddress(h + 8))
            .unwrap();
        descs.push(d(h, 16, VRING_DESC_F_NEXT, base + 1));
        descs.push(d(
            DATA + 0x1000 * u64::from(i),
            512,
            VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
            base + 2,
        ));
        descs.push(d(STATUS + u64::from(i), 1, VRING_DESC_F_WRITE, 0));
        descs.push(d(0, 0, 0, 0)); // padding, never referenced
    }
    // add_desc_chains starts a new chain after every descriptor without NEXT; drop padding.
    for i in 0..n {
        vq.desc_table().store(4 * i, descs[4 * i as usize]).unwrap();
        vq.desc_table()
            .store(4 * i + 1, descs[4 * i as usize + 1])
            .unwrap();
        vq.desc_table()
            .store(4 * i + 2, descs[4 * i as usize + 2])
            .unwrap();
        vq.avail()
            .ring()
            .ref_at(i as usize)
            .unwrap()
            .store(u16::to_le(4 * i));
    }
    vq.avail().idx().store(u16::to_le(n));
    let mut bq = BlockQueue::new(disk(&f, EngineChoice::IoUring, false, false), &m, QSIZE).unwrap();
    let mut out = bq.process_queue(&mut q).unwrap();
    out.merge(bq.drain(&mut q).unwrap());
    assert_eq!(out.used, u32::from(n));
    for i in 0..n {
        let s: u8 = m.read_obj(GuestAddress(STATUS + u64::from(i))).unwrap();
        assert_eq!(s, 0);
        let b: u8 = m
            .read_obj(GuestAddress(DATA + 0x1000 * u64::from(i)))
            .unwrap();
        assert_eq!(b, sector_byte(u64::from(i)));
    }
    assert_eq!(bq.stats().reads, u64::from(n));
}

#[test]
fn o_direct_unaligned_buffers_bounce() {
    for engine in ENGINES {
        let m = mem();
        let f = image();
        let dk = disk(&f, engine, false, true);
        assert!(dk.direct());
        // Unaligned guest buffer (DATA + 8): write then read back.
        hdr(&m, VIRTIO_BLK_T_OUT, 4);
        m.write_slice(&[0x77u8; 1024], GuestAddress(DATA + 8))
            .unwrap();
        let descs = vec![
            d(HDR, 16, VRING_DESC_F_NEXT, 1),
            d(DATA + 8, 1024, VRING_DESC_F_NEXT, 2),
            d(STATUS, 1, VRING_DESC_F_WRITE, 0),
        ];
        let r = run(&m, dk.clone(), &descs);
        assert_eq!(r.status, 0, "{engine:?}");
        let img = std::fs::read(f.as_path()).unwrap();
        assert!(img[4 * 512..6 * 512].iter().all(|&b| b == 0x77));

        hdr(&m, VIRTIO_BLK_T_IN, 5);
        let descs = vec![
            d(HDR, 16, VRING_DESC_F_NEXT, 1),
            d(
                DATA + 0x1003,
                512,
                VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
                2,
            ),
            d(STATUS, 1, VRING_DESC_F_WRITE, 0),
        ];
        let r = run(&m, dk.clone(), &descs);
        assert_eq!(r.status, 0);
        let b: u8 = m.read_obj(GuestAddress(DATA + 0x1003 + 511)).unwrap();
        assert_eq!(b, 0x77);

        // Aligned buffers go straight to the file.
        hdr(&m, VIRTIO_BLK_T_IN, 7);
        let r = run(&m, dk, &three(4096, true));
        assert_eq!(r.status, 0);
        let b: u8 = m.read_obj(GuestAddress(DATA)).unwrap();
        assert_eq!(b, sector_byte(7));
    }
}

#[test]
fn works_with_guest_memory_atomic_and_dirty_bitmap() {
    // The vhost-user daemons' memory type: GuestMemoryAtomic over an AtomicBitmap mmap.
    use vm_memory::bitmap::{AtomicBitmap, Bitmap};
    use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryRegion};
    type BMem = GuestMemoryMmap<AtomicBitmap>;
    let bm: BMem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let atomic = GuestMemoryAtomic::new(bm);
    let guard = atomic.memory();
    let f = image();
    guard
        .write_obj(VIRTIO_BLK_T_IN.to_le(), GuestAddress(HDR))
        .unwrap();
    guard
        .write_obj(1u64.to_le(), GuestAddress(HDR + 8))
        .unwrap();
    let vq = MockSplitQueue::new(&*guard, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.add_desc_chains(&three(512, true), 0).unwrap();
    for engine in ENGINES {
        q.set_next_avail(0);
        let mut bq =
            BlockQueue::new(disk(&f, engine, false, false), atomic.clone(), QSIZE).unwrap();
        bq.process_queue(&mut q).unwrap();
        bq.drain(&mut q).unwrap();
        let b: u8 = guard.read_obj(GuestAddress(DATA)).unwrap();
        assert_eq!(b, sector_byte(1));
        let region = guard.find_region(GuestAddress(DATA)).unwrap();
        assert!(
            region.bitmap().dirty_at(DATA as usize),
            "{engine:?}: DMA marked dirty"
        );
    }
}
