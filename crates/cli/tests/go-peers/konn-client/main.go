// Command konn-client dials through a Konnectivity server the way
// kube-apiserver does, for interop tests and benches:
//
//   - --uds PATH: konnectivity-client's CreateSingleUseGrpcTunnel over a unix
//     socket, one tunnel per dial (kube-apiserver's GRPC/UDS transport);
//   - --proxy-addr HOST:PORT with --ca-cert/--client-cert/--client-key: the
//     same over TCP with mTLS;
//   - --egress-config FILE: k8s.io/apiserver's egress selector reads an
//     EgressSelectorConfiguration and the `cluster` selection's dialer is used,
//     which is kube-apiserver's own code path for every transport.
//
// Each dial sends "POST /echo" and --payload bytes of a fixed pattern to
// --target, reads the echo back and compares SHA-256 hashes. One JSON line
// on stdout sums the run; the exit code is 0 only when every dial passed.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"k8s.io/apiserver/pkg/server/egressselector"
	"sigs.k8s.io/apiserver-network-proxy/konnectivity-client/pkg/client"
)

type options struct {
	uds, proxyAddr, egressConfig string
	ca, cert, key, serverName    string
	target                       string
	dials, concurrency, payload  int
	timeout, cancelAfter, hold   time.Duration
}

type summary struct {
	Dials     int            `json:"dials"`
	OK        int            `json:"ok"`
	Failed    int            `json:"failed"`
	Bytes     int64          `json:"bytes"`
	ElapsedS  float64        `json:"elapsed_s"`
	DialP50Ms float64        `json:"dial_p50_ms"`
	DialP99Ms float64        `json:"dial_p99_ms"`
	Errors    map[string]int `json:"errors"`
}

func main() {
	var o options
	flag.StringVar(&o.uds, "uds", "", "server's frontend unix socket (gRPC)")
	flag.StringVar(&o.proxyAddr, "proxy-addr", "", "server's frontend HOST:PORT (gRPC over mTLS)")
	flag.StringVar(&o.egressConfig, "egress-config", "", "EgressSelectorConfiguration file; dials via its `cluster` selection")
	flag.StringVar(&o.ca, "ca-cert", "", "CA of the server's frontend certificate (--proxy-addr)")
	flag.StringVar(&o.cert, "client-cert", "", "client certificate (--proxy-addr)")
	flag.StringVar(&o.key, "client-key", "", "client key (--proxy-addr)")
	flag.StringVar(&o.serverName, "server-name", "127.0.0.1", "TLS server name (--proxy-addr)")
	flag.StringVar(&o.target, "target", "", "backend HOST:PORT (an HTTP server with POST /echo)")
	flag.IntVar(&o.dials, "dials", 1, "dials in all")
	flag.IntVar(&o.concurrency, "concurrency", 1, "dials at once")
	flag.IntVar(&o.payload, "payload", 1024, "bytes sent and echoed on each connection")
	flag.DurationVar(&o.timeout, "timeout", 30*time.Second, "limit for one dial and its transfer")
	flag.DurationVar(&o.cancelAfter, "cancel-after", 0, "cancel each dial's context after this long (the dial is expected to fail)")
	flag.DurationVar(&o.hold, "hold", 0, "keep every connection open this long after its echo")
	flag.Parse()
	if o.target == "" || (o.uds == "") == (o.proxyAddr == "") == (o.egressConfig == "") {
		fmt.Fprintln(os.Stderr, "konn-client: --target and one of --uds, --proxy-addr, --egress-config are required")
		os.Exit(2)
	}
	dial, err := dialer(&o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "konn-client:", err)
		os.Exit(2)
	}
	pattern := make([]byte, o.payload)
	for i := range pattern {
		pattern[i] = byte(i*31 ^ i>>8)
	}
	want := sha256.Sum256(pattern)

	var (
		mu    sync.Mutex
		sum   = summary{Dials: o.dials, Errors: map[string]int{}}
		lat   []float64
		next  = make(chan struct{}, o.dials)
		wg    sync.WaitGroup
		start = time.Now()
	)
	for i := 0; i < o.dials; i++ {
		next <- struct{}{}
	}
	close(next)
	for w := 0; w < o.concurrency; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range next {
				d, n, err := one(&o, dial, pattern, want)
				mu.Lock()
				if err != nil {
					sum.Failed++
					sum.Errors[err.Error()]++
				} else {
					sum.OK++
					sum.Bytes += n
					lat = append(lat, d.Seconds()*1000)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	sum.ElapsedS = time.Since(start).Seconds()
	sort.Float64s(lat)
	if len(lat) > 0 {
		sum.DialP50Ms = lat[len(lat)*50/100]
		sum.DialP99Ms = lat[min(len(lat)-1, len(lat)*99/100)]
	}
	_ = json.NewEncoder(os.Stdout).Encode(sum)
	if sum.Failed > 0 {
		os.Exit(1)
	}
}

type dialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

func dialer(o *options) (dialFunc, error) {
	if o.egressConfig != "" {
		cfg, err := egressselector.ReadEgressSelectorConfiguration(o.egressConfig)
		if err != nil {
			return nil, err
		}
		if errs := egressselector.ValidateEgressSelectorConfiguration(cfg); len(errs) > 0 {
			return nil, errs.ToAggregate()
		}
		sel, err := egressselector.NewEgressSelector(cfg)
		if err != nil {
			return nil, err
		}
		d, err := sel.Lookup(egressselector.Cluster.AsNetworkContext())
		if err != nil || d == nil {
			return nil, fmt.Errorf("no dialer for the cluster selection: %v", err)
		}
		return dialFunc(d), nil
	}
	var opts []grpc.DialOption
	address := o.proxyAddr
	if o.uds != "" {
		// As kube-apiserver's GRPC/UDS connector: a plain unix socket,
		// no transport security.
		uds := o.uds
		address = uds
		opts = append(opts,
			grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", uds)
			}),
			grpc.WithTransportCredentials(insecure.NewCredentials()))
	} else {
		tc, err := clientTLS(o)
		if err != nil {
			return nil, err
		}
		opts = append(opts, grpc.WithTransportCredentials(credentials.NewTLS(tc)))
	}
	// One tunnel per dial, as kube-apiserver does; the tunnel ends with
	// its connection.
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		tunnel, err := client.CreateSingleUseGrpcTunnel(context.Background(), address, opts...)
		if err != nil {
			return nil, err
		}
		return tunnel.DialContext(ctx, network, addr)
	}, nil
}

func clientTLS(o *options) (*tls.Config, error) {
	pem, err := os.ReadFile(o.ca)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, errors.New("no certificate in " + o.ca)
	}
	pair, err := tls.LoadX509KeyPair(o.cert, o.key)
	if err != nil {
		return nil, err
	}
	return &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{pair}, ServerName: o.serverName}, nil
}

// one dials, echoes the payload and checks its hash; it returns how long
// the dial took and the bytes echoed.
func one(o *options, dial dialFunc, pattern []byte, want [32]byte) (time.Duration, int64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()
	dctx := ctx
	if o.cancelAfter > 0 {
		var c2 context.CancelFunc
		dctx, c2 = context.WithTimeout(ctx, o.cancelAfter)
		defer c2()
	}
	t0 := time.Now()
	conn, err := dial(dctx, "tcp", o.target)
	took := time.Since(t0)
	if err != nil {
		return took, 0, err
	}
	defer conn.Close()
	if o.cancelAfter > 0 {
		return took, 0, errors.New("dial succeeded although its context was to be cancelled")
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	head := fmt.Sprintf("POST /echo HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n", o.target, len(pattern))
	werr := make(chan error, 1)
	go func() {
		if _, err := conn.Write([]byte(head)); err != nil {
			werr <- err
			return
		}
		_, err := conn.Write(pattern)
		werr <- err
	}()
	r := bufio.NewReaderSize(conn, 64*1024)
	var status []byte
	for !bytes.HasSuffix(status, []byte("\r\n\r\n")) {
		b, err := r.ReadByte()
		if err != nil {
			return took, 0, fmt.Errorf("reading the response head: %w", err)
		}
		status = append(status, b)
	}
	if !bytes.HasPrefix(status, []byte("HTTP/1.1 200")) {
		return took, 0, fmt.Errorf("backend answered %q", bytes.SplitN(status, []byte("\r\n"), 2)[0])
	}
	h := sha256.New()
	n, err := io.CopyN(h, r, int64(len(pattern)))
	if err != nil {
		return took, n, fmt.Errorf("echo cut after %d of %d bytes: %w", n, len(pattern), err)
	}
	if err := <-werr; err != nil {
		return took, n, fmt.Errorf("sending: %w", err)
	}
	if !bytes.Equal(h.Sum(nil), want[:]) {
		return took, n, errors.New("echo hash differs")
	}
	if o.hold > 0 {
		time.Sleep(o.hold)
	}
	return took, n, nil
}
