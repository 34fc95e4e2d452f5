package endpoint

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kiln-dev/kiln/internal/endpoint/apitype"
)

// Environment variables the clients read.
const (
	EnvURL   = "KILN_URL"
	EnvToken = "KILN_TOKEN"
	EnvState = "KILN_STATE"
)

// DefaultStateDir is $KILN_STATE, else $XDG_STATE_HOME/kiln, else
// ~/.local/state/kiln.
func DefaultStateDir() (string, error) {
	if d := os.Getenv(EnvState); d != "" {
		return filepath.Abs(d)
	}
	if x := os.Getenv("XDG_STATE_HOME"); x != "" {
		return filepath.Join(x, "kiln"), nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("locating the state directory (set %s): %w", EnvState, err)
	}
	return filepath.Join(home, ".local", "state", "kiln"), nil
}

// Client is a small Go client of the API (used by kiln submit and kiln result).
type Client struct {
	URL   string
	Token string
	HTTP  *http.Client
}

// NewClient makes a client: url and token fall back to $KILN_URL and
// $KILN_TOKEN, then to http://127.0.0.1:8470 and the token file in stateDir
// (DefaultStateDir when empty).
func NewClient(rawURL, token, stateDir string) (*Client, error) {
	if rawURL == "" {
		rawURL = os.Getenv(EnvURL)
	}
	if rawURL == "" {
		rawURL = "http://" + DefaultListen
	}
	if token == "" {
		token = os.Getenv(EnvToken)
	}
	if token == "" {
		if stateDir == "" {
			d, err := DefaultStateDir()
			if err != nil {
				return nil, err
			}
			stateDir = d
		}
		b, err := os.ReadFile(filepath.Join(stateDir, TokenFile))
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("reading the endpoint's token: %w", err)
		}
		token = strings.TrimSpace(string(b))
	}
	return &Client{URL: strings.TrimRight(rawURL, "/"), Token: token, HTTP: &http.Client{}}, nil
}

// APIError is an error response of the endpoint.
type APIError struct {
	Status int
	apitype.ErrorBody
}

func (e *APIError) Error() string {
	return fmt.Sprintf("%s (HTTP %d, %s)", e.ErrorBody.Error, e.Status, e.Code)
}

// Do sends a request with a JSON body (nil: none) and decodes the JSON answer into dst.
func (c *Client) Do(ctx context.Context, method, path string, body, dst any) error {
	var r io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		r = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.URL+path, r)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return fmt.Errorf("reaching the kiln endpoint (is kiln serve running? set --url or %s): %w", EnvURL, err)
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("reading the endpoint's answer: %w", err)
	}
	if resp.StatusCode/100 != 2 {
		e := &APIError{Status: resp.StatusCode}
		if json.Unmarshal(out, &e.ErrorBody) != nil || e.Code == "" {
			e.ErrorBody = apitype.ErrorBody{Error: strings.TrimSpace(string(out)), Code: http.StatusText(resp.StatusCode)}
		}
		if resp.StatusCode == http.StatusUnauthorized {
			e.ErrorBody.Error += " (pass --token, set " + EnvToken + ", or read it from the endpoint's state directory)"
		}
		return e
	}
	if dst == nil {
		return nil
	}
	if err := json.Unmarshal(out, dst); err != nil {
		return fmt.Errorf("decoding the endpoint's answer: %w", err)
	}
	return nil
}

// Register registers a function and returns it.
func (c *Client) Register(ctx context.Context, req *apitype.RegisterRequest) (*apitype.FunctionView, error) {
	var fv apitype.FunctionView
	if err := c.Do(ctx, "POST", "/v1/functions", req, &fv); err != nil {
		return nil, err
	}
	return &fv, nil
}

// Submit queues one task and returns its id.
func (c *Client) Submit(ctx context.Context, req *apitype.SubmitRequest) (string, error) {
	var out struct {
		TaskID string `json:"task_id"`
	}
	if err := c.Do(ctx, "POST", "/v1/tasks", req, &out); err != nil {
		return "", err
	}
	return out.TaskID, nil
}

// Task returns a task, waiting up to wait for it to finish.
func (c *Client) Task(ctx context.Context, id string, wait time.Duration) (*apitype.TaskView, error) {
	p := "/v1/tasks/" + url.PathEscape(id)
	if wait > 0 {
		p += "?wait=" + url.QueryEscape(wait.String())
	}
	var tv apitype.TaskView
	if err := c.Do(ctx, "GET", p, nil, &tv); err != nil {
		return nil, err
	}
	return &tv, nil
}

// Await waits until the task finished or wait passed (0: forever),
// long-polling in rounds of at most a minute.
func (c *Client) Await(ctx context.Context, id string, wait time.Duration) (*apitype.TaskView, error) {
	var deadline time.Time
	if wait > 0 {
		deadline = time.Now().Add(wait)
	}
	for {
		round := time.Minute
		if !deadline.IsZero() {
			round = min(round, time.Until(deadline))
		}
		tv, err := c.Task(ctx, id, max(round, 0))
		if err != nil || apitype.Finished(tv.State) || (!deadline.IsZero() && time.Now().After(deadline)) {
			return tv, err
		}
	}
}
