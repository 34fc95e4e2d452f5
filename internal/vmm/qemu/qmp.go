package qemu

// This file is a small QMP (QEMU Machine Protocol) client.
//
// Why not an existing Go client such as github.com/digitalocean/go-qemu/qmp:
// those dial an address (a socket path or TCP port) and cannot speak over an
// already connected socketpair inherited by QEMU, nor pass file descriptors
// with SCM_RIGHTS, which kiln needs for "getfd" (migration to and from files
// under QEMU's seccomp sandbox, where "exec:" migration is impossible). QMP is
// a line of JSON per message, so a client is little code.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// maxQMPLine bounds one QMP message; QEMU's answers are far smaller.
const maxQMPLine = 4 << 20

// QMPError is an error answer from QEMU to a QMP command.
type QMPError struct {
	Command string `json:"-"`
	Class   string `json:"class"`
	Desc    string `json:"desc"`
}

func (e *QMPError) Error() string {
	return fmt.Sprintf("qmp %s: %s (%s)", e.Command, e.Desc, e.Class)
}

// Event is an asynchronous QMP event.
type Event struct {
	Name string
	Data json.RawMessage
	Time time.Time
}

// qmpMessage is any message QEMU sends: exactly one of Greeting, Return,
// Error or Event is set.
type qmpMessage struct {
	Greeting  json.RawMessage `json:"QMP"`
	Return    json.RawMessage `json:"return"`
	Error     json.RawMessage `json:"error"`
	Event     string          `json:"event"`
	Data      json.RawMessage `json:"data"`
	Timestamp *struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
	ID json.RawMessage `json:"id"`

	err *QMPError // decoded Error
}

type qmpKind int

const (
	kindGreeting qmpKind = iota + 1
	kindReturn
	kindError
	kindEvent
)

func (m *qmpMessage) kind() qmpKind {
	switch {
	case m.Greeting != nil:
		return kindGreeting
	case m.Return != nil:
		return kindReturn
	case m.err != nil:
		return kindError
	default:
		return kindEvent
	}
}

// decodeQMP decodes one line received from QEMU.
func decodeQMP(line []byte) (*qmpMessage, error) {
	line = bytes.TrimSpace(line)
	if len(line) == 0 || line[0] != '{' {
		return nil, fmt.Errorf("qmp: message is not a JSON object: %.64q", line)
	}
	var m qmpMessage
	if err := json.Unmarshal(line, &m); err != nil {
		return nil, fmt.Errorf("qmp: decoding message: %w", err)
	}
	n := 0
	if m.Greeting != nil {
		n++
	}
	if m.Return != nil {
		n++
	}
	if m.Error != nil {
		n++
		var e QMPError
		if err := json.Unmarshal(m.Error, &e); err != nil {
			return nil, fmt.Errorf("qmp: decoding error answer: %w", err)
		}
		if e.Class == "" && e.Desc == "" {
			return nil, errors.New("qmp: error answer without class or description")
		}
		m.err = &e
	}
	if m.Event != "" {
		n++
	}
	if n != 1 {
		return nil, fmt.Errorf("qmp: message has %d of greeting/return/error/event, want 1: %.64q", n, line)
	}
	if (m.Return != nil || m.Error != nil) && m.ID != nil {
		if _, err := parseID(m.ID); err != nil {
			return nil, err
		}
	}
	return &m, nil
}

func parseID(raw json.RawMessage) (uint64, error) {
	id, err := strconv.ParseUint(string(raw), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("qmp: bad message id %.32q", raw)
	}
	return id, nil
}

// qmpClient is a QMP connection. Commands may be issued concurrently.
type qmpClient struct {
	conn    *net.UnixConn
	log     *slog.Logger
	onEvent func(Event) // called on the reader goroutine, must not block

	wmu sync.Mutex // serializes writes

	mu       sync.Mutex
	nextID   uint64
	pending  map[uint64]chan *qmpMessage
	subs     map[chan Event][]string
	greeting chan struct{}
	greeted  bool
	done     chan struct{} // closed when the reader stops
	err      error         // why the reader stopped; valid after done
}

func newQMP(conn *net.UnixConn, log *slog.Logger, onEvent func(Event)) *qmpClient {
	q := &qmpClient{
		conn:     conn,
		log:      log,
		onEvent:  onEvent,
		pending:  make(map[uint64]chan *qmpMessage),
		subs:     make(map[chan Event][]string),
		greeting: make(chan struct{}),
		done:     make(chan struct{}),
	}
	go q.readLoop()
	return q
}

// handshake waits for QEMU's greeting and leaves capabilities negotiation
// mode.
func (q *qmpClient) handshake(ctx context.Context) error {
	select {
	case <-q.greeting:
	case <-q.done:
		return fmt.Errorf("qmp: waiting for greeting: %w", q.err)
	case <-ctx.Done():
		return fmt.Errorf("qmp: waiting for greeting: %w", ctx.Err())
	}
	return q.Execute(ctx, "qmp_capabilities", nil, nil)
}

func (q *qmpClient) readLoop() {
	r := bufio.NewReaderSize(q.conn, 64<<10)
	err := func() error {
		for {
			line, err := readLine(r, maxQMPLine)
			if err != nil {
				return err
			}
			msg, err := decodeQMP(line)
			if err != nil {
				return err
			}
			q.dispatch(msg)
		}
	}()
	if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
		err = errors.New("qmp connection closed")
	}
	q.mu.Lock()
	q.err = err
	for id, ch := range q.pending {
		close(ch)
		delete(q.pending, id)
	}
	q.mu.Unlock()
	close(q.done)
}

// readLine reads one '\n'-terminated line of at most max bytes.
func readLine(r *bufio.Reader, max int) ([]byte, error) {
	var line []byte
	for {
		frag, err := r.ReadSlice('\n')
		if len(line)+len(frag) > max {
			return nil, fmt.Errorf("qmp: message longer than %d bytes", max)
		}
		line = append(line, frag...)
		switch {
		case err == nil:
			return line, nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case errors.Is(err, io.EOF) && len(line) > 0:
			return nil, io.ErrUnexpectedEOF
		default:
			return nil, err
		}
	}
}

func (q *qmpClient) dispatch(msg *qmpMessage) {
	switch msg.kind() {
	case kindGreeting:
		q.mu.Lock()
		if !q.greeted {
			q.greeted = true
			close(q.greeting)
		}
		q.mu.Unlock()
	case kindEvent:
		ev := Event{Name: msg.Event, Data: msg.Data}
		if msg.Timestamp != nil {
			ev.Time = time.Unix(msg.Timestamp.Seconds, msg.Timestamp.Microseconds*1000)
		}
		q.log.Debug("qmp event", "event", ev.Name, "data", string(ev.Data))
		if q.onEvent != nil {
			q.onEvent(ev)
		}
		q.mu.Lock()
		for ch, names := range q.subs {
			for _, n := range names {
				if n == ev.Name {
					select {
					case ch <- ev:
					default:
						q.log.Warn("qmp event dropped: subscriber not reading", "event", ev.Name)
					}
					break
				}
			}
		}
		q.mu.Unlock()
	default:
		if msg.ID == nil {
			q.log.Warn("qmp answer without id ignored")
			return
		}
		id, _ := parseID(msg.ID) // validated by decodeQMP
		q.mu.Lock()
		ch := q.pending[id]
		delete(q.pending, id)
		q.mu.Unlock()
		if ch == nil {
			q.log.Warn("qmp answer for unknown id ignored", "id", id)
			return
		}
		ch <- msg
	}
}

// subscribe returns a channel receiving the named events until cancel is
// called.
func (q *qmpClient) subscribe(names ...string) (<-chan Event, func()) {
	ch := make(chan Event, 16)
	q.mu.Lock()
	q.subs[ch] = names
	q.mu.Unlock()
	return ch, func() {
		q.mu.Lock()
		delete(q.subs, ch)
		q.mu.Unlock()
	}
}

// Execute runs a QMP command and decodes its return value into out (if not
// nil). args is marshalled as the command's arguments (nil: none).
func (q *qmpClient) Execute(ctx context.Context, cmd string, args, out any) error {
	return q.execute(ctx, cmd, args, out, -1)
}

// ExecuteFD is Execute with fd passed along with the command (SCM_RIGHTS),
// as "getfd" and "add-fd" want.
func (q *qmpClient) ExecuteFD(ctx context.Context, cmd string, args, out any, fd int) error {
	if fd < 0 {
		return fmt.Errorf("qmp %s: invalid fd %d", cmd, fd)
	}
	return q.execute(ctx, cmd, args, out, fd)
}

func (q *qmpClient) execute(ctx context.Context, cmd string, args, out any, fd int) error {
	q.mu.Lock()
	select {
	case <-q.done:
		q.mu.Unlock()
		return fmt.Errorf("qmp %s: %w", cmd, q.err)
	default:
	}
	q.nextID++
	id := q.nextID
	ch := make(chan *qmpMessage, 1)
	q.pending[id] = ch
	q.mu.Unlock()
	forget := func() {
		q.mu.Lock()
		delete(q.pending, id)
		q.mu.Unlock()
	}

	req := struct {
		Execute   string `json:"execute"`
		Arguments any    `json:"arguments,omitempty"`
		ID        uint64 `json:"id"`
	}{cmd, args, id}
	b, err := json.Marshal(req)
	if err != nil {
		forget()
		return fmt.Errorf("qmp %s: encoding arguments: %w", cmd, err)
	}
	b = append(b, '\n')
	q.log.Debug("qmp command", "cmd", cmd, "id", id)
	if err := q.write(ctx, b, fd); err != nil {
		forget()
		return fmt.Errorf("qmp %s: %w", cmd, err)
	}

	select {
	case msg, ok := <-ch:
		if !ok {
			return fmt.Errorf("qmp %s: %w", cmd, q.err)
		}
		if msg.err != nil {
			e := *msg.err
			e.Command = cmd
			return &e
		}
		if out != nil {
			if err := json.Unmarshal(msg.Return, out); err != nil {
				return fmt.Errorf("qmp %s: decoding answer: %w", cmd, err)
			}
		}
		return nil
	case <-ctx.Done():
		forget()
		return fmt.Errorf("qmp %s: %w", cmd, ctx.Err())
	}
}

func (q *qmpClient) write(ctx context.Context, b []byte, fd int) error {
	q.wmu.Lock()
	defer q.wmu.Unlock()
	if dl, ok := ctx.Deadline(); ok {
		q.conn.SetWriteDeadline(dl)
		defer q.conn.SetWriteDeadline(time.Time{})
	}
	if fd < 0 {
		_, err := q.conn.Write(b)
		return err
	}
	// The fd must travel with the command's first byte: QEMU attaches
	// received fds to the monitor when it reads the bytes they came with.
	n, oobn, err := q.conn.WriteMsgUnix(b, unix.UnixRights(fd), nil)
	if err != nil {
		return err
	}
	if oobn == 0 {
		return errors.New("file descriptor not sent")
	}
	if n < len(b) {
		_, err = q.conn.Write(b[n:])
	}
	return err
}
