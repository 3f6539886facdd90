//! The generation worker: one thread that owns the loaded pipeline and runs the queued jobs one
//! at a time, in arrival order, while the HTTP side only queues jobs and waits for their answers.
//!
//! Why a thread of its own: `Pipeline` is not `Send` (its models sit in `Rc`/`RefCell`, and the
//! CUDA engine keeps cuDNN handles per thread), and a denoising loop would block an async
//! runtime's threads for seconds. The queue is a bounded channel, so a full queue is an
//! immediate answer (503) instead of a growing backlog.

use crate::app::one_line;
use crate::infotext::{self, FileHashes, Pictures};
use crate::output;
use crate::pipeline::{Pipeline, Request};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::oneshot;

/// What a job was asked to stop for (the value of its `stop` flag).
const RUN: u8 = 0;
/// `/sdapi/v1/interrupt`: stop, and answer with the images made so far (as the web UI does).
const INTERRUPT: u8 = 1;
/// The client went away, or the server is shutting down: stop, nobody needs the images.
const CANCEL: u8 = 2;

/// The loaded model, as the APIs describe it.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The Hub id, folder or file it was loaded from.
    pub name: String,
    /// (height, width) when a request gives none.
    pub default_size: (usize, usize),
}

/// One generated image: the PNG (with the same metadata as the CLI writes) and its infotext.
pub struct Image {
    pub png: Vec<u8>,
    /// The web UI's "parameters" text, as in the PNG.
    pub parameters: String,
}

/// A job's answer.
pub struct Finished {
    pub images: Vec<Image>,
    /// Stopped by `/sdapi/v1/interrupt`: `images` holds those made before.
    pub interrupted: bool,
    /// Seconds from the job's start to its answer (the `Server-Timing` header).
    pub seconds: f64,
}

#[derive(Debug)]
pub enum JobError {
    /// The request cannot run (the pipeline's checks): the client's mistake.
    Invalid(String),
    /// The server is shutting down.
    ShuttingDown,
    /// Cancelled: its client went away.
    Cancelled,
    /// Generation failed (non-finite values, a broken weight file, a panic).
    Failed(String),
}

/// Why a job could not be queued.
#[derive(Debug)]
pub enum SubmitError {
    QueueFull(usize),
    ShuttingDown,
}

/// What a job needs beyond the pipeline's request (image-to-image's).
#[derive(Default)]
pub struct Extras {
    /// The pictures it started from, for the PNGs' metadata.
    pub pictures: Pictures,
    /// The picture and blurred mask laid back over each image (the web UI's overlay).
    pub overlay: Option<(image::RgbImage, image::GrayImage)>,
}

struct Job {
    request: Request,
    extras: Extras,
    stop: Arc<AtomicU8>,
    reply: oneshot::Sender<Result<Finished, JobError>>,
}

/// The job now running, for `/sdapi/v1/progress` and `/sdapi/v1/interrupt`.
pub struct Running {
    /// "txt2img" or "img2img", as the web UI names its jobs.
    pub kind: &'static str,
    pub step: usize,
    pub total: usize,
    pub started: Instant,
    /// The web UI's `job_timestamp` (local time of the start, `%Y%m%d%H%M%S`; here UTC).
    pub timestamp: String,
    stop: Arc<AtomicU8>,
}

#[derive(Default)]
pub struct Progress {
    pub running: Option<Running>,
    /// Jobs waiting behind the running one.
    pub queued: usize,
    /// Whether the last job was stopped by an interrupt.
    pub interrupted: bool,
    shutting_down: bool,
}

/// The HTTP side's handle on the worker: cheap to clone.
#[derive(Clone)]
pub struct Queue {
    tx: SyncSender<Job>,
    capacity: usize,
    pub progress: Arc<Mutex<Progress>>,
    pub model: Arc<ModelInfo>,
}

/// A queued job's answer to come. Dropping it before the answer (the client disconnected and
/// its request's future was dropped) cancels the job at its next step.
pub struct Ticket {
    rx: oneshot::Receiver<Result<Finished, JobError>>,
    stop: Arc<AtomicU8>,
    answered: bool,
}

impl Ticket {
    pub async fn wait(mut self) -> Result<Finished, JobError> {
        let answer = (&mut self.rx).await;
        self.answered = true;
        answer.unwrap_or_else(|_| Err(JobError::Failed("the generation worker stopped".into())))
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.answered {
            let _ = self
                .stop
                .compare_exchange(RUN, CANCEL, Ordering::SeqCst, Ordering::SeqCst);
        }
    }
}

fn lock(p: &Mutex<Progress>) -> std::sync::MutexGuard<'_, Progress> {
    // a panic while holding it leaves plain numbers behind: still usable
    p.lock().unwrap_or_else(|e| e.into_inner())
}

impl Queue {
    /// Queues `request`; refused at once when `capacity` jobs already wait.
    pub fn submit(&self, request: Request, extras: Extras) -> Result<Ticket, SubmitError> {
        let mut progress = lock(&self.progress);
        if progress.shutting_down {
            return Err(SubmitError::ShuttingDown);
        }
        let (reply, rx) = oneshot::channel();
        let stop = Arc::new(AtomicU8::new(RUN));
        let job = Job {
            request,
            extras,
            stop: stop.clone(),
            reply,
        };
        match self.tx.try_send(job) {
            Ok(()) => {
                progress.queued += 1;
                Ok(Ticket {
                    rx,
                    stop,
                    answered: false,
                })
            }
            Err(TrySendError::Full(_)) => Err(SubmitError::QueueFull(self.capacity)),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::ShuttingDown),
        }
    }

    /// Stops the running job at its next step; it answers with the images made so far.
    /// Whether a job was running.
    pub fn interrupt(&self) -> bool {
        let progress = lock(&self.progress);
        match &progress.running {
            Some(r) => {
                let _ = r
                    .stop
                    .compare_exchange(RUN, INTERRUPT, Ordering::SeqCst, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// Refuses new jobs, cancels the running one and answers the queued ones with
    /// [`JobError::ShuttingDown`].
    pub fn shut_down(&self) {
        let mut progress = lock(&self.progress);
        progress.shutting_down = true;
        if let Some(r) = &progress.running {
            r.stop.store(CANCEL, Ordering::SeqCst);
        }
    }
}

/// Starts the worker thread: `load` makes the pipeline there; returns once it is loaded (or
/// with its error), with the queue (`capacity` waiting jobs) and the thread, which ends when
/// every [`Queue`] is dropped.
pub fn start(
    load: impl FnOnce() -> anyhow::Result<Pipeline> + Send + 'static,
    capacity: usize,
) -> anyhow::Result<(Queue, std::thread::JoinHandle<()>)> {
    let (tx, rx) = sync_channel::<Job>(capacity);
    let progress = Arc::new(Mutex::new(Progress::default()));
    let (loaded_tx, loaded_rx) = std::sync::mpsc::channel();
    let worker_progress = progress.clone();
    let thread = std::thread::Builder::new()
        .name("sdgen-worker".into())
        .spawn(move || {
            let pipeline = match load() {
                Ok(p) => p,
                Err(e) => {
                    let _ = loaded_tx.send(Err(e));
                    return;
                }
            };
            let (height, width) = pipeline.default_size();
            let info = ModelInfo {
                name: pipeline.files.name.clone(),
                default_size: (height, width),
            };
            if loaded_tx.send(Ok(info)).is_err() {
                return;
            }
            work(&pipeline, rx, &worker_progress);
        })?;
    let model = match loaded_rx.recv() {
        Ok(Ok(info)) => info,
        Ok(Err(e)) => {
            let _ = thread.join();
            return Err(e);
        }
        Err(_) => anyhow::bail!("the generation worker stopped while loading the model"),
    };
    Ok((
        Queue {
            tx,
            capacity,
            progress,
            model: Arc::new(model),
        },
        thread,
    ))
}

/// The worker's loop: each job in turn until the queue's senders are gone.
fn work(pipeline: &Pipeline, rx: Receiver<Job>, progress: &Mutex<Progress>) {
    let mut hashes = FileHashes::default();
    for job in rx {
        let start = {
            let mut p = lock(progress);
            p.queued = p.queued.saturating_sub(1);
            if p.shutting_down {
                Err(JobError::ShuttingDown)
            } else if job.stop.load(Ordering::SeqCst) != RUN {
                // its client left while it waited
                Err(JobError::Cancelled)
            } else {
                p.running = Some(Running {
                    kind: if job.request.image.is_some() {
                        "img2img"
                    } else {
                        "txt2img"
                    },
                    step: 0,
                    total: 0,
                    started: Instant::now(),
                    timestamp: utc_timestamp(),
                    stop: job.stop.clone(),
                });
                p.interrupted = false;
                Ok(())
            }
        };
        let answer = start.and_then(|()| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run(pipeline, &job, progress, &mut hashes)
            }))
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(JobError::Failed(format!("generation panicked: {what}")))
            })
        });
        {
            let mut p = lock(progress);
            if p.running.take().is_some() {
                p.interrupted = matches!(&answer, Ok(f) if f.interrupted);
            }
        }
        let _ = job.reply.send(answer);
    }
}

/// The error a job's step callback stops the pipeline with.
#[derive(Debug)]
struct Stopped;

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stopped")
    }
}

impl std::error::Error for Stopped {}

fn run(
    pipeline: &Pipeline,
    job: &Job,
    progress: &Mutex<Progress>,
    hashes: &mut FileHashes,
) -> Result<Finished, JobError> {
    let t = Instant::now();
    let r = &job.request;
    pipeline
        .validate(r)
        .map_err(|e| JobError::Invalid(one_line(&e)))?;
    let scheduler = infotext::scheduler_name(pipeline, r.scheduler.as_deref());
    let mut images = Vec::new();
    let result = pipeline.generate(
        r,
        &mut |step, total| {
            if let Some(running) = &mut lock(progress).running {
                (running.step, running.total) = (step, total);
            }
            match job.stop.load(Ordering::SeqCst) {
                RUN => Ok(()),
                _ => Err(Stopped.into()),
            }
        },
        &mut |mut img| {
            if let Some((picture, mask)) = &job.extras.overlay {
                crate::input_image::overlay(&mut img.rgb, picture, mask);
            }
            let meta = infotext::metadata(
                pipeline,
                r,
                None,
                &job.extras.pictures,
                &scheduler,
                &img,
                hashes,
            )?;
            let png = output::encode_png(img.width, img.height, &img.rgb, &meta)?;
            images.push(Image {
                png,
                parameters: meta[0].1.clone(),
            });
            Ok(())
        },
    );
    let interrupted = match result {
        Ok(()) => false,
        Err(e) if e.is::<Stopped>() => match job.stop.load(Ordering::SeqCst) {
            INTERRUPT => true,
            _ if lock(progress).shutting_down => return Err(JobError::ShuttingDown),
            _ => return Err(JobError::Cancelled),
        },
        Err(e) => return Err(JobError::Failed(one_line(&e))),
    };
    Ok(Finished {
        images,
        interrupted,
        seconds: t.elapsed().as_secs_f64(),
    })
}

/// Now as the web UI's `job_timestamp`, `%Y%m%d%H%M%S` (UTC: no time-zone database here).
pub fn utc_timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rest) = (secs / 86400, secs % 86400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// Howard Hinnant's days-to-civil-date: (year, month, day) of `z` days after 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::civil_from_days;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        // 2000-02-29 and 2026-12-04 (date -d @... +%F)
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_791), (2026, 12, 4));
    }
}
