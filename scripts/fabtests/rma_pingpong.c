/*
 * Copyright (c) 2013-2016 Intel Corporation.  All rights reserved.
 * Copyright (c) 2023 Amazon.com, Inc. or its affiliates. All rights reserved.
 *
 * This software is available to you under the BSD license
 * below:
 *
 *     Redistribution and use in source and binary forms, with or
 *     without modification, are permitted provided that the following
 *     conditions are met:
 *
 *      - Redistributions of source code must retain the above
 *        copyright notice, this list of conditions and the following
 *        disclaimer.
 *
 *      - Redistributions in binary form must reproduce the above
 *        copyright notice, this list of conditions and the following
 *        disclaimer in the documentation and/or other materials
 *        provided with the distribution.
 *
 * THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND,
 * EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF
 * MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
 * NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS
 * BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN
 * ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN
 * CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
 * SOFTWARE.
 */

#include <stdio.h>
#include <stdlib.h>
#include <getopt.h>

#include <rdma/fi_errno.h>

#include <shared.h>
#include "benchmark_shared.h"

/*
 * m2n: fabtests 1.21's fi_rma_pingpong (benchmarks/rma_pingpong.c, with
 * pingpong_rma from its benchmarks/benchmark_shared.c and ft_rx_rma from its
 * common/shared.c), ported to the helpers of fabtests 1.17 (Debian 12's
 * libfabric), which has no RMA ping-pong of its own. Only writedata (the
 * write with remote CQ data m2n makes) is kept: the target learns of each
 * write from its completion queue. scripts/build-fabtests builds it when the
 * installed fabtests are older than 1.21.
 */

/* The target's side of one iteration: the write-with-data's completion. */
static int rx_writedata(void)
{
	int ret = ft_get_rx_comp(rx_seq);
	if (ret)
		return ret;
	if (fi->rx_attr->mode & FI_RX_CQ_DATA)
		return ft_post_rx(ep, 0, &rx_ctx);
	/* Wait for the next write's completion on the next iteration. */
	rx_seq++;
	return 0;
}

/* One write with data, injected when it fits (no completion asked). */
static int tx_writedata(struct fi_rma_iov *remote, size_t inject_size)
{
	int ret;

	if (opts.transfer_size <= inject_size)
		return ft_post_rma_inject(FT_RMA_WRITEDATA, ep, opts.transfer_size,
					  remote);
	ret = ft_post_rma(FT_RMA_WRITEDATA, ep, opts.transfer_size, remote,
			  &tx_ctx);
	if (ret)
		return ret;
	return ft_get_tx_comp(tx_seq);
}

static int pingpong_rma(struct fi_rma_iov *remote)
{
	int ret, i;
	size_t inject_size = hints->tx_attr->inject_size ?
			hints->tx_attr->inject_size : fi->tx_attr->inject_size;

	if (ft_check_opts(FT_OPT_ENABLE_HMEM))
		inject_size = 0;

	ret = ft_sync();
	if (ret)
		return ret;

	if (opts.transfer_size == 0) {
		FT_ERR("Zero-sized transfers not supported");
		return EXIT_FAILURE;
	}

	for (i = 0; i < opts.iterations + opts.warmup_iterations; i++) {
		if (i == opts.warmup_iterations)
			ft_start();
		if (opts.dst_addr) {
			ret = tx_writedata(remote, inject_size);
			if (!ret)
				ret = rx_writedata();
		} else {
			ret = rx_writedata();
			if (!ret)
				ret = tx_writedata(remote, inject_size);
		}
		if (ret)
			return ret;
	}
	ft_stop();

	if (opts.machr)
		show_perf_mr(opts.transfer_size, opts.iterations, &start, &end, 2,
				opts.argc, opts.argv);
	else
		show_perf(NULL, opts.transfer_size, opts.iterations, &start, &end, 2);

	return 0;
}

static int run(void)
{
	int i, ret;

	if (hints->ep_attr->type == FI_EP_MSG) {
		if (!opts.dst_addr) {
			ret = ft_start_server();
			if (ret)
				return ret;
		}

		ret = opts.dst_addr ? ft_client_connect() : ft_server_connect();
	} else {
		ret = ft_init_fabric();
	}
	if (ret)
		return ret;

	ret = ft_exchange_keys(&remote);
	if (ret)
		return ret;

	if (!(opts.options & FT_OPT_SIZE)) {
		for (i = 0; i < TEST_CNT; i++) {
			if (!ft_use_size(i, opts.sizes_enabled))
				continue;
			opts.transfer_size = test_size[i].size;
			init_test(&opts, test_name, sizeof(test_name));
			ret = pingpong_rma(&remote);
			if (ret)
				goto out;
		}
	} else {
		init_test(&opts, test_name, sizeof(test_name));
		ret = pingpong_rma(&remote);
		if (ret)
			goto out;
	}

	ft_finalize();
out:
	return ret;
}

int main(int argc, char **argv)
{
	int op, ret;

	opts = INIT_OPTS;

	hints = fi_allocinfo();
	if (!hints)
		return EXIT_FAILURE;

	hints->caps = FI_MSG | FI_RMA | FI_WRITE | FI_REMOTE_WRITE;
	hints->domain_attr->resource_mgmt = FI_RM_ENABLED;
	hints->mode = FI_CONTEXT;
	hints->domain_attr->threading = FI_THREAD_DOMAIN;
	hints->addr_format = opts.address_format;

	while ((op = getopt_long(argc, argv, "Uh" CS_OPTS INFO_OPTS API_OPTS
			    BENCHMARK_OPTS, long_opts, &lopt_idx)) != -1) {
		switch (op) {
		default:
			if (!ft_parse_long_opts(op, optarg))
				continue;
			ft_parse_benchmark_opts(op, optarg);
			ft_parseinfo(op, optarg, hints, &opts);
			ft_parsecsopts(op, optarg, &opts);
			ret = ft_parse_api_opts(op, optarg, hints, &opts);
			if (ret)
				return ret;
			break;
		case 'U':
			hints->tx_attr->op_flags |= FI_DELIVERY_COMPLETE;
			break;
		case '?':
		case 'h':
			ft_csusage(argv[0], "Pingpong test using RMA operations.");
			ft_benchmark_usage();
			FT_PRINT_OPTS_USAGE("-o writedata", "rma op type (required: only writedata is ported)\n");
			ft_longopts_usage();
			return EXIT_FAILURE;
		}
	}

	if (opts.rma_op != FT_RMA_WRITEDATA) {
		FT_ERR("Only writedata is supported by this port of rma_pingpong");
		return EXIT_FAILURE;
	}

	if (optind < argc)
		opts.dst_addr = argv[optind];

	hints->domain_attr->mr_mode = opts.mr_mode;

	ret = run();

	ft_free_res();
	return -ret;
}
