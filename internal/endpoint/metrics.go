package endpoint

import (
	"fmt"
	"io"
	"math"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// The metrics are written in the Prometheus text exposition format (0.0.4)
// by this small registry: the client_golang module's dependencies are not
// vendored in this repository.

// Acquire kinds label kiln_vm_acquire_seconds.
const (
	AcquireWarm    = "warm"    // an idle VM was ready
	AcquireRestore = "restore" // a VM was restored from a snapshot
	AcquireCold    = "cold"    // a VM was booted
)

var latencyBuckets = []float64{0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300}

type histogram struct {
	counts []uint64 // per bucket, not cumulative; last is +Inf
	sum    float64
	n      uint64
}

func (h *histogram) observe(v float64) {
	if h.counts == nil {
		h.counts = make([]uint64, len(latencyBuckets)+1)
	}
	i := sort.SearchFloat64s(latencyBuckets, v) // first bucket >= v
	h.counts[i]++
	h.sum += v
	h.n++
}

type metrics struct {
	mu        sync.Mutex
	queueWait histogram
	acquire   map[string]*histogram
	exec      histogram
	completed map[string]uint64 // by final state
	submitted uint64
	rejected  uint64 // 429s
	boots     map[string]uint64
	bootFails uint64
}

func newMetrics() *metrics {
	return &metrics{
		acquire:   map[string]*histogram{AcquireWarm: {}, AcquireRestore: {}, AcquireCold: {}},
		completed: map[string]uint64{StateSucceeded: 0, StateFailed: 0, StateCancelled: 0},
		boots:     map[string]uint64{AcquireRestore: 0, AcquireCold: 0},
	}
}

func (m *metrics) observeQueueWait(d time.Duration) {
	m.mu.Lock()
	m.queueWait.observe(d.Seconds())
	m.mu.Unlock()
}

func (m *metrics) observeAcquire(kind string, d time.Duration) {
	m.mu.Lock()
	m.acquire[kind].observe(d.Seconds())
	m.mu.Unlock()
}

func (m *metrics) observeExec(d time.Duration) {
	m.mu.Lock()
	m.exec.observe(d.Seconds())
	m.mu.Unlock()
}

func (m *metrics) add(f func(m *metrics)) {
	m.mu.Lock()
	f(m)
	m.mu.Unlock()
}

// gaugeSnapshot is read at scrape time from the store and the scheduler.
type gaugeSnapshot struct {
	tasks     map[string]int
	vms       map[string]int // idle, busy, starting
	vmMemMiB  int
	queued    int
	maxVMs    int
	maxMemMiB int
}

func fmtFloat(v float64) string {
	if math.IsInf(v, 1) {
		return "+Inf"
	}
	return strconv.FormatFloat(v, 'g', -1, 64)
}

func writeHistogram(w io.Writer, name, labels string, h *histogram) {
	sep := ""
	if labels != "" {
		sep = ","
	}
	var cum uint64
	for i, b := range latencyBuckets {
		if h.counts != nil {
			cum += h.counts[i]
		}
		fmt.Fprintf(w, "%s_bucket{%s%sle=\"%s\"} %d\n", name, labels, sep, fmtFloat(b), cum)
	}
	fmt.Fprintf(w, "%s_bucket{%s%sle=\"+Inf\"} %d\n", name, labels, sep, h.n)
	if labels != "" {
		labels = "{" + labels + "}"
	}
	fmt.Fprintf(w, "%s_sum%s %s\n", name, labels, fmtFloat(h.sum))
	fmt.Fprintf(w, "%s_count%s %d\n", name, labels, h.n)
}

func sortedKeys[V any](m map[string]V) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// write renders every metric.
func (m *metrics) write(w io.Writer, g gaugeSnapshot) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var b strings.Builder
	b.WriteString("# HELP kiln_tasks Tasks in the store by state.\n# TYPE kiln_tasks gauge\n")
	for _, st := range States {
		fmt.Fprintf(&b, "kiln_tasks{state=%q} %d\n", st, g.tasks[st])
	}
	b.WriteString("# HELP kiln_tasks_submitted_total Tasks accepted since the endpoint started.\n# TYPE kiln_tasks_submitted_total counter\n")
	fmt.Fprintf(&b, "kiln_tasks_submitted_total %d\n", m.submitted)
	b.WriteString("# HELP kiln_tasks_rejected_total Submissions refused with 429 because the queue was full.\n# TYPE kiln_tasks_rejected_total counter\n")
	fmt.Fprintf(&b, "kiln_tasks_rejected_total %d\n", m.rejected)
	b.WriteString("# HELP kiln_tasks_completed_total Tasks finished since the endpoint started, by final state.\n# TYPE kiln_tasks_completed_total counter\n")
	for _, st := range sortedKeys(m.completed) {
		fmt.Fprintf(&b, "kiln_tasks_completed_total{state=%q} %d\n", st, m.completed[st])
	}
	b.WriteString("# HELP kiln_scheduler_queued Tasks waiting in the scheduler's queues.\n# TYPE kiln_scheduler_queued gauge\n")
	fmt.Fprintf(&b, "kiln_scheduler_queued %d\n", g.queued)
	b.WriteString("# HELP kiln_vms VMs by state.\n# TYPE kiln_vms gauge\n")
	for _, st := range sortedKeys(g.vms) {
		fmt.Fprintf(&b, "kiln_vms{state=%q} %d\n", st, g.vms[st])
	}
	b.WriteString("# HELP kiln_vm_memory_mib Guest memory of the VMs that are running or starting.\n# TYPE kiln_vm_memory_mib gauge\n")
	fmt.Fprintf(&b, "kiln_vm_memory_mib %d\n", g.vmMemMiB)
	b.WriteString("# HELP kiln_vms_max The cap on concurrent VMs.\n# TYPE kiln_vms_max gauge\n")
	fmt.Fprintf(&b, "kiln_vms_max %d\n", g.maxVMs)
	b.WriteString("# HELP kiln_vm_memory_max_mib The cap on the VMs' total guest memory.\n# TYPE kiln_vm_memory_max_mib gauge\n")
	fmt.Fprintf(&b, "kiln_vm_memory_max_mib %d\n", g.maxMemMiB)
	b.WriteString("# HELP kiln_vm_starts_total VMs started, by how (cold boot or snapshot restore).\n# TYPE kiln_vm_starts_total counter\n")
	for _, k := range sortedKeys(m.boots) {
		fmt.Fprintf(&b, "kiln_vm_starts_total{kind=%q} %d\n", k, m.boots[k])
	}
	b.WriteString("# HELP kiln_vm_start_failures_total VM starts that failed.\n# TYPE kiln_vm_start_failures_total counter\n")
	fmt.Fprintf(&b, "kiln_vm_start_failures_total %d\n", m.bootFails)
	b.WriteString("# HELP kiln_task_queue_wait_seconds Time from submission (or requeue) to dispatch.\n# TYPE kiln_task_queue_wait_seconds histogram\n")
	writeHistogram(&b, "kiln_task_queue_wait_seconds", "", &m.queueWait)
	b.WriteString("# HELP kiln_vm_acquire_seconds Time to get a VM for a task: warm (idle VM), restore (snapshot) or cold (boot).\n# TYPE kiln_vm_acquire_seconds histogram\n")
	for _, k := range []string{AcquireWarm, AcquireRestore, AcquireCold} {
		writeHistogram(&b, "kiln_vm_acquire_seconds", fmt.Sprintf("kind=%q", k), m.acquire[k])
	}
	b.WriteString("# HELP kiln_task_execution_seconds Time a task spent in its VM (the Invoke call).\n# TYPE kiln_task_execution_seconds histogram\n")
	writeHistogram(&b, "kiln_task_execution_seconds", "", &m.exec)
	io.WriteString(w, b.String())
}
