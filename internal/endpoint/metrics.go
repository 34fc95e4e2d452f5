package endpoint

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/kiln-dev/kiln/internal/endpoint/apitype"
	"github.com/kiln-dev/kiln/internal/endpoint/slurm"
)

// The metrics live in a prometheus.Registry per Server (never the global
// default registry, so several servers can share a process) and are served
// by promhttp in the Prometheus text exposition format.

// Acquire kinds label kiln_vm_acquire_seconds.
const (
	AcquireWarm    = "warm"    // an idle VM was ready
	AcquireRestore = "restore" // a VM was restored from a snapshot
	AcquireCold    = "cold"    // a VM was booted
)

var latencyBuckets = []float64{0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300}

// metrics holds the endpoint's counters and histograms; the gauges are read
// at scrape time by a gaugeCollector (see watch).
type metrics struct {
	reg       *prometheus.Registry
	queueWait prometheus.Histogram
	acquire   *prometheus.HistogramVec // by kind
	exec      prometheus.Histogram
	completed *prometheus.CounterVec // by final state
	submitted prometheus.Counter
	rejected  prometheus.Counter     // 429s
	boots     *prometheus.CounterVec // by kind (cold, restore)
	bootFails prometheus.Counter
}

func newMetrics() *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		queueWait: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "kiln_task_queue_wait_seconds",
			Help:    "Time from submission (or requeue) to dispatch.",
			Buckets: latencyBuckets,
		}),
		acquire: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "kiln_vm_acquire_seconds",
			Help:    "Time to get a VM for a task: warm (idle VM), restore (snapshot) or cold (boot).",
			Buckets: latencyBuckets,
		}, []string{"kind"}),
		exec: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "kiln_task_execution_seconds",
			Help:    "Time a task spent in its VM (the Invoke call).",
			Buckets: latencyBuckets,
		}),
		completed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kiln_tasks_completed_total",
			Help: "Tasks finished since the endpoint started, by final state.",
		}, []string{"state"}),
		submitted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kiln_tasks_submitted_total",
			Help: "Tasks accepted since the endpoint started.",
		}),
		rejected: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kiln_tasks_rejected_total",
			Help: "Submissions refused with 429 because the queue was full.",
		}),
		boots: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kiln_vm_starts_total",
			Help: "VMs started, by how (cold boot or snapshot restore).",
		}, []string{"kind"}),
		bootFails: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kiln_vm_start_failures_total",
			Help: "VM starts that failed.",
		}),
	}
	// Create the labelled series up front so that they are exposed as 0
	// before the first event.
	for _, k := range []string{AcquireWarm, AcquireRestore, AcquireCold} {
		m.acquire.WithLabelValues(k)
	}
	for _, st := range []string{apitype.StateSucceeded, apitype.StateFailed, apitype.StateCancelled} {
		m.completed.WithLabelValues(st)
	}
	for _, k := range []string{AcquireRestore, AcquireCold} {
		m.boots.WithLabelValues(k)
	}
	m.reg.MustRegister(m.queueWait, m.acquire, m.exec, m.completed, m.submitted, m.rejected, m.boots, m.bootFails)
	return m
}

func (m *metrics) observeQueueWait(d time.Duration) { m.queueWait.Observe(d.Seconds()) }

func (m *metrics) observeAcquire(kind string, d time.Duration) {
	m.acquire.WithLabelValues(kind).Observe(d.Seconds())
}

func (m *metrics) observeExec(d time.Duration) { m.exec.Observe(d.Seconds()) }

// gaugeSnapshot is read at scrape time from the store and the scheduler.
type gaugeSnapshot struct {
	tasks     map[string]int
	vms       map[string]int // idle, busy, starting
	vmMemMiB  int
	queued    int
	maxVMs    int
	maxMemMiB int
	blocks    map[string]int // a provider's blocks by state; nil: local provider
	workers   map[string]int // workers by state
}

// watch registers the gauges, which snap reads at every scrape.
func (m *metrics) watch(snap func(ctx context.Context) (gaugeSnapshot, error)) {
	m.reg.MustRegister(&gaugeCollector{snap: snap})
}

// handler serves the registry; errors are logged to log and answered 500.
func (m *metrics) handler(log *slog.Logger) http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{
		ErrorLog:      promLogger{log},
		ErrorHandling: promhttp.HTTPErrorOnError,
		Timeout:       time.Minute,
	})
}

// promLogger adapts a *slog.Logger to promhttp.Logger.
type promLogger struct{ log *slog.Logger }

func (l promLogger) Println(v ...any) { l.log.Error("serving metrics", "error", fmt.Sprint(v...)) }

var (
	descTasks     = prometheus.NewDesc("kiln_tasks", "Tasks in the store by state.", []string{"state"}, nil)
	descQueued    = prometheus.NewDesc("kiln_scheduler_queued", "Tasks waiting in the scheduler's queues.", nil, nil)
	descVMs       = prometheus.NewDesc("kiln_vms", "VMs by state.", []string{"state"}, nil)
	descVMMem     = prometheus.NewDesc("kiln_vm_memory_mib", "Guest memory of the VMs that are running or starting.", nil, nil)
	descVMsMax    = prometheus.NewDesc("kiln_vms_max", "The cap on concurrent VMs.", nil, nil)
	descVMMemMax  = prometheus.NewDesc("kiln_vm_memory_max_mib", "The cap on the VMs' total guest memory.", nil, nil)
	descBlocks    = prometheus.NewDesc("kiln_blocks", "The provider's blocks (pilot jobs) by state: the active states count the blocks now, the final states every block that ended since the endpoint started.", []string{"state"}, nil)
	descWorkers   = prometheus.NewDesc("kiln_workers", "Registered workers by state.", []string{"state"}, nil)
	gaugeDescs    = []*prometheus.Desc{descTasks, descQueued, descVMs, descVMMem, descVMsMax, descVMMemMax, descBlocks, descWorkers}
	scrapeTimeout = 30 * time.Second
)

// gaugeCollector reports the store's and the scheduler's gauges from one
// snapshot per scrape, so that they are consistent with each other.
type gaugeCollector struct {
	snap func(ctx context.Context) (gaugeSnapshot, error)
}

func (c *gaugeCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range gaugeDescs {
		ch <- d
	}
}

func (c *gaugeCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), scrapeTimeout)
	defer cancel()
	g, err := c.snap(ctx)
	if err != nil {
		ch <- prometheus.NewInvalidMetric(descTasks, err)
		return
	}
	gauge := func(d *prometheus.Desc, v int, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, float64(v), labels...)
	}
	for _, st := range apitype.States {
		gauge(descTasks, g.tasks[st], st)
	}
	gauge(descQueued, g.queued)
	for st, n := range g.vms {
		gauge(descVMs, n, st)
	}
	gauge(descVMMem, g.vmMemMiB)
	gauge(descVMsMax, g.maxVMs)
	gauge(descVMMemMax, g.maxMemMiB)
	if g.blocks != nil {
		for _, st := range slurm.States {
			gauge(descBlocks, g.blocks[string(st)], string(st))
		}
	}
	for _, st := range []string{apitype.WorkerActive, apitype.WorkerDraining, apitype.WorkerLost, apitype.WorkerGone} {
		gauge(descWorkers, g.workers[st], st)
	}
}
