package slurm

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestStateOf(t *testing.T) {
	tests := []struct {
		in   string
		want State
		ok   bool
	}{
		{"PD", StatePending, true}, {"CF", StatePending, true}, {"S", StatePending, true}, {"ST", StatePending, true},
		{"RQ", StatePending, true}, {"RH", StatePending, true},
		{"R", StateRunning, true}, {"RS", StateRunning, true}, {"SI", StateRunning, true},
		{"CG", StateCompleting, true}, {"SO", StateCompleting, true},
		{"CD", StateCompleted, true}, {"COMPLETED", StateCompleted, true},
		{"CA", StateCancelled, true}, {"CANCELLED by 1000", StateCancelled, true}, {"PR", StateCancelled, true},
		{"F", StateFailed, true}, {"NF", StateFailed, true}, {"BF", StateFailed, true}, {"OOM", StateFailed, true},
		{"OUT_OF_MEMORY", StateFailed, true}, {"NODE_FAIL", StateFailed, true},
		{"TO", StateTimeout, true}, {"DL", StateTimeout, true}, {"TIMEOUT", StateTimeout, true},
		{"RUNNING+", StateRunning, true}, {" r ", StateRunning, true},
		{"XX", StateUnknown, false}, {"", StateUnknown, false},
	}
	for _, tt := range tests {
		got, ok := stateOf(tt.in)
		if got != tt.want || ok != tt.ok {
			t.Errorf("stateOf(%q) = %q, %v; want %q, %v", tt.in, got, ok, tt.want, tt.ok)
		}
	}
	for _, s := range []State{StatePending, StateRunning, StateCompleting} {
		if !s.Active() {
			t.Errorf("%q.Active() = false, want true", s)
		}
	}
	for _, s := range []State{StateCompleted, StateFailed, StateCancelled, StateTimeout, StateUnknown} {
		if s.Active() {
			t.Errorf("%q.Active() = true, want false", s)
		}
	}
}

func TestParseSqueue(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want []squeueRow
		err  string
	}{
		{name: "empty", in: "", want: nil},
		{
			name: "states",
			in: "101|PD||Resources\n102|R|node[01-04]|None\n103|CG|node05|None\n" +
				"104|PD||ReqNodeNotAvail, UnavailableNodes:node[1-2]|x\n105|CD|localhost|None\n  106|CA|(null)|None  \n",
			want: []squeueRow{
				{JobID: "101", Code: "PD", State: StatePending, Reason: "Resources"},
				{JobID: "102", Code: "R", State: StateRunning, Nodes: "node[01-04]"},
				{JobID: "103", Code: "CG", State: StateCompleting, Nodes: "node05"},
				{JobID: "104", Code: "PD", State: StatePending, Reason: "ReqNodeNotAvail, UnavailableNodes:node[1-2]|x"},
				{JobID: "105", Code: "CD", State: StateCompleted, Nodes: "localhost"},
				{JobID: "106", Code: "CA", State: StateCancelled},
			},
		},
		{name: "unknown code", in: "7|ZZ|n1|None\n", want: []squeueRow{{JobID: "7", Code: "ZZ", State: StateUnknown, Nodes: "n1"}}},
		{
			name: "a bad line among good ones",
			in:   "7|R|n1|None\nslurm_load_jobs error: Socket timed out\n8|PD||Priority\n",
			want: []squeueRow{{JobID: "7", Code: "R", State: StateRunning, Nodes: "n1"}, {JobID: "8", Code: "PD", State: StatePending, Reason: "Priority"}},
			err:  `line 2 "slurm_load_jobs error: Socket timed out": want JOBID|STATE|NODES|REASON`,
		},
		{name: "array job", in: "9_3|R|n1|None\n", want: []squeueRow{{JobID: "9_3", Code: "R", State: StateRunning, Nodes: "n1"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseSqueue(tt.in)
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("parseSqueue(%q) (-want +got):\n%s", tt.in, diff)
			}
			if (tt.err == "") != (err == nil) || err != nil && !strings.Contains(err.Error(), tt.err) {
				t.Errorf("parseSqueue(%q) error = %v, want %q", tt.in, err, tt.err)
			}
		})
	}
}

func TestParseSacct(t *testing.T) {
	in := "11|COMPLETED\n12|CANCELLED by 1000\n12.batch|CANCELLED\n13|NODE_FAIL\n14|TIMEOUT\n15|RUNNING\n16|OUT_OF_MEMORY\ngarbage\n17|REQUEUED\n17|FAILED\n"
	got, err := parseSacct(in)
	want := map[string]sacctRow{
		"11": {JobID: "11", Raw: "COMPLETED", State: StateCompleted},
		"12": {JobID: "12", Raw: "CANCELLED by 1000", State: StateCancelled},
		"13": {JobID: "13", Raw: "NODE_FAIL", State: StateFailed},
		"14": {JobID: "14", Raw: "TIMEOUT", State: StateTimeout},
		"15": {JobID: "15", Raw: "RUNNING", State: StateRunning},
		"16": {JobID: "16", Raw: "OUT_OF_MEMORY", State: StateFailed},
		"17": {JobID: "17", Raw: "FAILED", State: StateFailed},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("parseSacct (-want +got):\n%s", diff)
	}
	if err == nil || !strings.Contains(err.Error(), `line 8 "garbage"`) {
		t.Errorf("parseSacct error = %v, want one naming line 8", err)
	}
}

func TestParseSbatch(t *testing.T) {
	tests := []struct {
		in, want string
		ok       bool
	}{
		{"123\n", "123", true},
		{"123;cluster1\n", "123", true},
		{"sbatch: warning: something\n4567\n", "4567", true},
		{"", "", false},
		{"Submitted batch job 12\n", "", false},
		{";x", "", false},
		{"12a", "", false},
	}
	for _, tt := range tests {
		got, err := parseSbatch(tt.in)
		if got != tt.want || (err == nil) != tt.ok {
			t.Errorf("parseSbatch(%q) = %q, %v; want %q, ok %v", tt.in, got, err, tt.want, tt.ok)
		}
	}
}

func TestScancelHarmless(t *testing.T) {
	tests := []struct {
		in   string
		want bool
	}{
		{"", false},
		{"scancel: error: Kill job error on job id 12: Job/step already completing or completed\n", true},
		{"scancel: error: Kill job error on job id 12: Invalid job id specified\nscancel: error: Kill job error on job id 13: Job/step already completing or completed\n", true},
		{"scancel: error: Kill job error on job id 12: Invalid job id specified\nscancel: error: Unable to contact slurm controller\n", false},
		{"scancel: error: Kill job error on job id 12: Access/permission denied\n", false},
	}
	for _, tt := range tests {
		if got := scancelHarmless(tt.in); got != tt.want {
			t.Errorf("scancelHarmless(%q) = %v, want %v", tt.in, got, tt.want)
		}
	}
}

func TestConfigKeys(t *testing.T) {
	tests := []struct {
		msg  string
		want []string
	}{
		{"sbatch: error: invalid partition specified: nosuch\nallocation failure: Invalid partition name specified", []string{"partition"}},
		{"sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified", []string{"account", "partition"}},
		{"sbatch: error: Batch job submission failed: Invalid qos specification", []string{"qos"}},
		{"sbatch: error: Invalid --time specification", []string{"walltime"}},
		{"sbatch: error: Batch job submission failed: Requested time limit is invalid (missing or exceeds some limit)", []string{"walltime"}},
		{"allocation failure: Invalid feature specification", []string{"constraint"}},
		{"sbatch: error: Invalid --mem specification", []string{"mem"}},
		{"allocation failure: Requested node configuration is not available", []string{"nodes_per_block", "cpus_per_task", "mem", "constraint", "exclusive"}},
		{"sbatch: error: Batch job submission failed: Node count specification invalid", []string{"nodes_per_block"}},
		{"sbatch: unrecognized option '--bogus'", []string{"scheduler_options"}},
		{"sbatch: error: Batch job submission failed: Access/permission denied", nil},
	}
	for _, tt := range tests {
		if diff := cmp.Diff(tt.want, configKeys(tt.msg)); diff != "" {
			t.Errorf("configKeys(%q) (-want +got):\n%s", tt.msg, diff)
		}
	}
}

func TestNextState(t *testing.T) {
	pending := Block{ID: "b1", JobID: "7", State: StatePending}
	running := Block{ID: "b1", JobID: "7", State: StateRunning, Nodes: "n1"}
	tests := []struct {
		name       string
		b          Block
		cancelled  bool
		ran        bool
		row        *squeueRow
		acct       *sacctRow
		sacctWorks bool
		want       Block
	}{
		{name: "squeue: pending with a reason", b: pending, row: &squeueRow{JobID: "7", Code: "PD", State: StatePending, Reason: "Priority"},
			want: Block{ID: "b1", JobID: "7", State: StatePending, Reason: "Priority"}},
		{name: "squeue: running", b: pending, row: &squeueRow{JobID: "7", Code: "R", State: StateRunning, Nodes: "n1"}, want: running},
		{name: "squeue: cancelled while pending", b: pending, cancelled: true, row: &squeueRow{JobID: "7", Code: "CA", State: StateCancelled, Reason: "Resources"},
			want: Block{ID: "b1", JobID: "7", State: StateCancelled}},
		{name: "squeue: timed out", b: running, ran: true, row: &squeueRow{JobID: "7", Code: "TO", State: StateTimeout, Nodes: "n1", Reason: "TimeLimit"},
			want: Block{ID: "b1", JobID: "7", State: StateTimeout, Nodes: "n1", Reason: "TimeLimit"}},
		{name: "squeue: an unknown code", b: running, row: &squeueRow{JobID: "7", Code: "ZZ", State: StateUnknown, Nodes: "n1"},
			want: Block{ID: "b1", JobID: "7", State: StateUnknown, Nodes: "n1", Reason: "Slurm state ZZ"}},
		{name: "sacct: node failure", b: running, ran: true, acct: &sacctRow{JobID: "7", Raw: "NODE_FAIL", State: StateFailed}, sacctWorks: true,
			want: Block{ID: "b1", JobID: "7", State: StateFailed, Nodes: "n1", Reason: "NODE_FAIL"}},
		{name: "sacct: completed", b: running, ran: true, acct: &sacctRow{JobID: "7", Raw: "COMPLETED", State: StateCompleted}, sacctWorks: true,
			want: Block{ID: "b1", JobID: "7", State: StateCompleted, Nodes: "n1"}},
		{name: "sacct still running, squeue gone: ran", b: running, ran: true, acct: &sacctRow{JobID: "7", Raw: "RUNNING", State: StateRunning}, sacctWorks: true,
			want: Block{ID: "b1", JobID: "7", State: StateCompleted, Nodes: "n1", Reason: "no longer listed by squeue"}},
		{name: "gone, cancelled by kiln", b: running, cancelled: true, ran: true,
			want: Block{ID: "b1", JobID: "7", State: StateCancelled, Nodes: "n1", Reason: "cancelled by kiln"}},
		{name: "gone after running, no sacct", b: running, ran: true,
			want: Block{ID: "b1", JobID: "7", State: StateCompleted, Nodes: "n1", Reason: "no longer listed by squeue; sacct does not work here"}},
		{name: "gone, never seen running", b: pending,
			want: Block{ID: "b1", JobID: "7", State: StateUnknown, Reason: "no longer listed by squeue; sacct does not work here"}},
	}
	for _, tt := range tests {
		got := nextState(tt.b, tt.cancelled, tt.ran, tt.row, tt.acct, tt.sacctWorks)
		if diff := cmp.Diff(tt.want, got); diff != "" {
			t.Errorf("nextState(%s) (-want +got):\n%s", tt.name, diff)
		}
	}
}

func TestClusterDown(t *testing.T) {
	tests := []struct {
		msg  string
		want bool
	}{
		{"allocation failure: Unable to contact slurm controller (connect failure)", true},
		{"slurm_load_jobs error: Unable to contact slurm controller (connect failure)", true},
		{"sbatch: error: Invalid user for SlurmUser root, ignored / sbatch: error: Munge encode failed: Failed to access \"/run/munge/munge.socket.2\"", true},
		{"slurm_load_jobs error: Socket timed out on send/recv operation", true},
		{"sbatch: error: invalid partition specified: nosuch", false},
	}
	for _, tt := range tests {
		if got := clusterDown(tt.msg); got != tt.want {
			t.Errorf("clusterDown(%q) = %v, want %v", tt.msg, got, tt.want)
		}
	}
}
